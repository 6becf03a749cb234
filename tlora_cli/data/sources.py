"""Where calibration samples come from (the built-in set, a local file or folder, a named set, a hub id) and
which ones are picked: a seeded shuffle, then the first N usable records in that order."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TloraError
from .builtin import builtin_samples
from .files import FORMATS_HELP, file_format, read_records
from .hub import STREAM_BUFFER, NoDataFiles, NotCached, NotFound, Split, cached_snapshot, open_split
from .messages import is_conversation, messages_sample
from .options import DataOptions
from .records import RecordFormat, detect_format, record_to_sample
from .registry import REGISTRY, DatasetSpec
from .samples import EmptyRecord, Sample

# A hub dataset id, org/name: a bare name is taken for a misspelt registry name or a missing file.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Chosen:
    """The picked samples (in order, each with where it came from) and what the metadata records about them."""

    samples: list[Sample]
    wheres: list[str]
    source: str
    sha256: str
    num_available: int
    num_skipped: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)


def choose_samples(options: DataOptions, num_samples: int, seed: int) -> Chosen:
    """Resolve `options.data` and pick `num_samples` samples by a seeded shuffle."""
    options.check()
    data = options.data
    if data is None:
        samples, source, sha256 = builtin_samples()
        return _pick_samples(samples, source, sha256, num_samples, seed)
    name, sep, local = data.partition("=")
    if sep and name in REGISTRY:
        return _named_local_copy(REGISTRY[name], data, Path(local).expanduser(), options, num_samples, seed)
    path = Path(data).expanduser()
    if path.is_dir():
        fmt = options.record_format(None)
        split = _open(str(path), _configs(options, ()), options.split or "train", options.streaming, data)
        return _pick_split(split, fmt, None, data, num_samples, seed, {"folder": str(path)})
    if path.exists():
        return _local_file(path, data, options, num_samples, seed)
    if data in REGISTRY:
        return _named_hub(REGISTRY[data], options, num_samples, seed)
    if _HUB_ID.fullmatch(data) and not _has_file_suffix(data):
        fmt = options.record_format(None)
        split = _hub_split(data, _configs(options, ()), options.split or "train", options.streaming, "--data DIR")
        provenance = {"hub_id": data, "config": options.config, "split": options.split or "train"}
        return _pick_split(split, fmt, None, data, num_samples, seed, provenance)
    raise TloraError(
        f"no data file or dataset named '{data}'{_did_you_mean(data)}; pass a local {FORMATS_HELP} file or a "
        f"dataset folder, a dataset name ({', '.join(REGISTRY)}), or a hub dataset id as org/name"
    )


def _local_file(path: Path, label: str, options: DataOptions, num_samples: int, seed: int) -> Chosen:
    fmt = options.record_format(None)
    records, sha256 = read_records(path)
    if fmt is None:  # each record's own shape, every record checked up front (the file is the user's to fix)
        records = [(where, record_to_sample(record, where)) for where, record in records]
        return _pick(_shuffled(records, seed), _identity, num_samples, label, sha256, len(records))
    return _pick(_shuffled(records, seed), fmt.to_sample, num_samples, label, sha256, len(records))


def _named_local_copy(
    spec: DatasetSpec, label: str, path: Path, options: DataOptions, num_samples: int, seed: int
) -> Chosen:
    fmt = options.record_format(spec.format)
    provenance = {"name": spec.name, "hub_id": spec.hub_id, "local_copy": str(path)}
    if path.is_dir():
        configs, streaming = _configs(options, spec.configs), _streaming(spec, options)
        split = _open(str(path), configs, options.split or spec.split, streaming, label)
        return _pick_split(split, fmt, spec.group, label, num_samples, seed, provenance)
    records, sha256 = read_records(path)  # a file is one split, whatever the set's config and split
    if spec.group is not None:
        records = [(f"{path}: record {i}", r) for i, r in enumerate(spec.group(r for _, r in records), start=1)]
    chosen = _pick(_shuffled(records, seed), fmt.to_sample, num_samples, label, sha256, len(records))
    chosen.provenance = provenance | {"format": fmt.describe()}
    return chosen


def _named_hub(spec: DatasetSpec, options: DataOptions, num_samples: int, seed: int) -> Chosen:
    fmt = options.record_format(spec.format)
    configs = _configs(options, spec.configs)
    split_name = options.split or spec.split
    split = _hub_split(spec.hub_id, configs, split_name, _streaming(spec, options), f"--data {spec.name}=DIR")
    provenance = {"name": spec.name, "hub_id": spec.hub_id, "config": ", ".join(configs) or None, "split": split_name}
    return _pick_split(split, fmt, spec.group, spec.name, num_samples, seed, provenance)


def _configs(options: DataOptions, default: tuple[str, ...]) -> tuple[str, ...]:
    return (options.config,) if options.config else default


def _streaming(spec: DatasetSpec, options: DataOptions) -> bool:
    if options.streaming and spec.group is not None:
        raise TloraError(f"{spec.name} is regrouped into documents, which needs the whole split; drop --streaming")
    return spec.streaming if options.streaming is None else options.streaming


def _hub_split(hub_id: str, configs: tuple[str, ...], split: str, streaming: bool | None, local_flag: str) -> Split:
    """The split from the hub (or `datasets`' own cache), else from a snapshot in the hub cache."""
    try:
        return open_split(hub_id, configs, split, streaming, hub_id)
    except NotCached:
        pass
    except NotFound as e:
        raise TloraError(f"{e}; check the id, or log in (`hf auth login`) for a gated dataset") from None
    snapshot = cached_snapshot(hub_id)
    if snapshot is not None:
        try:
            split_rows = open_split(str(snapshot), configs, split, streaming, hub_id)
        except NoDataFiles:
            pass  # a snapshot downloaded in part (often the card alone): the dataset is not cached
        else:
            split_rows.revision = snapshot.name
            return split_rows
    raise TloraError(
        f"cannot reach the Hugging Face Hub for dataset '{hub_id}' and no copy of it is cached; run once with "
        f"network access (later runs work with HF_HUB_OFFLINE=1), or download it elsewhere "
        f"(`hf download {hub_id} --repo-type dataset --local-dir DIR`) and pass {local_flag}"
    )


def _open(path: str, configs: tuple[str, ...], split: str, streaming: bool | None, label: str) -> Split:
    """A local folder: `datasets` never needs the network for one."""
    try:
        return open_split(path, configs, split, streaming, label)
    except (NotCached, NotFound):
        raise TloraError(f"{label}: not a dataset folder `datasets` can read; pass a data file instead") from None


def _pick_split(
    split: Split,
    fmt: RecordFormat | None,
    group: Callable[[Iterable[Mapping]], list[dict]] | None,
    label: str,
    num_samples: int,
    seed: int,
    provenance: dict[str, Any],
) -> Chosen:
    rows, streaming, num_rows = split.rows, split.streaming, split.num_rows
    if group is not None:
        rows, streaming = group(rows), False
        num_rows = len(rows)
    if streaming:
        # Only the shuffle buffer and the picked records are read, never the whole split.
        stream = rows.shuffle(seed=seed, buffer_size=max(STREAM_BUFFER, num_samples))
        candidates = ((f"{label}: streamed record {k}", record) for k, record in enumerate(stream, start=1))
    else:
        candidates = ((f"{label}: record {i + 1}", rows[i]) for i in _shuffled(range(num_rows), seed))
    mapper = _Mapper(fmt, label)
    try:
        chosen = _pick(candidates, mapper, num_samples, label, None, num_rows)
    except ConnectionError:
        raise TloraError(f"{label}: the connection to the hub dropped while streaming; try again") from None
    described = mapper.format.describe() if mapper.format else None
    chosen.provenance = provenance | {"revision": split.revision, "streaming": streaming, "format": described}
    return chosen


class _Mapper:
    """Map records with `fmt`, or with the shape the first record's fields imply; check its fields once."""

    def __init__(self, fmt: RecordFormat | None, label: str) -> None:
        self.format, self.label, self.checked, self.conversation = fmt, label, False, False

    def __call__(self, record: Any, where: str) -> Sample:
        if not self.checked:
            if not isinstance(record, Mapping):
                raise TloraError(f"{where}: expected a record with named fields, got {type(record).__name__}")
            if self.format is None and is_conversation(record):  # TRL's `messages`: no fields to name
                self.conversation = True
            elif self.format is None:
                self.format = detect_format(record, self.label)
            if not self.conversation:
                self.format.check_columns(record, self.label)
            self.checked = True
        if self.conversation:
            return messages_sample(record, where)
        return self.format.to_sample(record, where)


def _pick_samples(samples: list[Sample], source: str, sha256: str, num_samples: int, seed: int) -> Chosen:
    labelled = [(f"{source}: sample {i}", sample) for i, sample in enumerate(samples, start=1)]
    return _pick(_shuffled(labelled, seed), _identity, num_samples, source, sha256, len(samples))


def _pick(
    candidates: Iterable[tuple[str, Any]],
    to_sample: Callable[[Any, str], Sample],
    num_samples: int,
    source: str,
    sha256: str | None,
    num_records: int | None,
) -> Chosen:
    """The first `num_samples` usable candidates. A record with an empty or null text, prompt or response
    (EmptyRecord) is skipped and counted: a hub dataset cannot be fixed by the user, and a trainer drops such
    records too."""
    samples, wheres, skipped, first = [], [], 0, ""
    for where, record in candidates:
        try:
            sample = to_sample(record, where)
        except EmptyRecord as e:
            skipped, first = skipped + 1, first or str(e)
            continue
        samples.append(sample)
        wheres.append(where)
        if len(samples) == num_samples:
            break
    if not samples and skipped:
        raise TloraError(
            f"{source}: no usable samples: all {skipped} records have an empty or null text, prompt or response "
            f"(the first, {first})"
        )
    if not samples:
        raise TloraError(f"{source}: the split has no records; pick another with --data-split")
    ran_out = len(samples) < num_samples
    if sha256 is None:  # a dataset read in part: hash what was picked, which is what the statistics saw
        picked = json.dumps([dataclasses.asdict(s) for s in samples], ensure_ascii=False, sort_keys=True)
        sha256 = hashlib.sha256(picked.encode()).hexdigest()
    num_available = len(samples) if ran_out or num_records is None else num_records - skipped
    return Chosen(samples, wheres, source, sha256, num_available, skipped)


def _shuffled(items: Iterable[Any], seed: int) -> list[Any]:
    order = list(items)
    random.Random(seed).shuffle(order)
    return order


def _identity(sample: Sample, where: str) -> Sample:
    return sample


def _did_you_mean(data: str) -> str:
    close = difflib.get_close_matches(data, list(REGISTRY), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _has_file_suffix(data: str) -> bool:
    try:
        file_format(data)
    except TloraError:
        return False
    return True
