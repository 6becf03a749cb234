"""Reading a split through `datasets`: hub ids and dataset folders, streamed when big, and offline-aware.

Offline, `datasets` itself falls back to the Arrow copy a previous online run prepared in HF_DATASETS_CACHE.
When that is missing too, a snapshot of the dataset repo in the hub cache (`hf download --repo-type dataset`)
is read as a local folder: `datasets` does not look there by itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TloraError, is_connection_error

# Above this many bytes to download (when the dataset card says), a split is streamed rather than prepared.
STREAM_ABOVE_BYTES = 2**30
# Shuffle buffer of a stream: only this many records (at least the number asked for) are read ahead.
STREAM_BUFFER = 1_000


@dataclass
class Split:
    """One split's rows: a map-style Dataset, or an IterableDataset when streamed."""

    rows: Any
    streaming: bool
    revision: str | None
    num_rows: int | None  # known without reading the rows (a prepared split, or a card that says)


class NotCached(Exception):
    """The hub could not be reached and no copy is on this machine."""


class NotFound(Exception):
    """The hub answered that there is no such dataset (or that it is gated): the caller words the advice."""


class NoDataFiles(TloraError):
    """A folder (or a snapshot of a repo downloaded in part) lacks the data files of the config asked for."""


def open_split(path: str, configs: Sequence[str | None], split: str, streaming: bool | None, label: str) -> Split:
    """The split of a hub id or a local dataset folder; several configs are concatenated in order.

    `streaming=None` streams when the dataset card's download size is above STREAM_ABOVE_BYTES. Raises
    NotCached for a hub id that cannot be reached and is not cached, NotFound for one the hub does not have,
    TloraError for every other problem.
    """
    import datasets

    with contextlib.nullcontext() if Path(path).exists() else offline_unless_answered(path):
        parts = [_open_one(path, configs[0] if configs else None, split, streaming, label)]
        for config in configs[1:]:  # read alike: the first config decided whether to stream
            parts.append(_open_one(path, config, split, parts[0].streaming, label))
    if len(parts) == 1:
        return parts[0]
    counts = [part.num_rows for part in parts]
    return Split(
        datasets.concatenate_datasets([part.rows for part in parts]),
        parts[0].streaming,
        parts[0].revision,
        None if None in counts else sum(counts),
    )


@contextlib.contextmanager
def offline_unless_answered(hub_id: str) -> Iterator[None]:
    """`datasets` retries a hub it cannot reach five times with back-off (about 23 s, a warning each) before it
    reads its cache. One call of huggingface_hub's API, which does not retry, asks first: when the hub does not
    answer, `datasets` runs in its own offline mode for the block (its cache at once); when it answers, as it is."""
    import datasets.config
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    answered = True
    if not constants.HF_HUB_OFFLINE:
        try:
            HfApi().dataset_info(hub_id)
        except (OfflineModeIsEnabled, HfHubHTTPError, ValueError):
            pass  # an answer (404, gated, a bad id): `datasets` says what it is
        except Exception as e:  # the HTTP client's own connection errors, whichever client huggingface_hub uses
            answered = not is_connection_error(e)
    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = saved or not answered
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def cached_snapshot(hub_id: str) -> Path | None:
    """The hub-cache snapshot of dataset repo `hub_id`, if one was downloaded; never goes online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hub_id, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):  # ValueError: not a valid repo id
        return None


def _open_one(path: str, config: str | None, split: str, streaming: bool | None, label: str) -> Split:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    where = label + (f" (config {config})" if config else "")
    try:
        builder = datasets.load_dataset_builder(path, config)
        size = builder.info.download_size
        stream = streaming if streaming is not None else bool(size and size > STREAM_ABOVE_BYTES)
        if stream:
            rows = builder.as_streaming_dataset(split=split)
        else:
            builder.download_and_prepare()
            rows = builder.as_dataset(split=split)
    except ConnectionError:
        raise NotCached from None
    except DatasetNotFoundError as e:
        raise NotFound(_one_line(e)) from None
    except ValueError as e:
        if str(e).startswith("Couldn't find cache for"):  # offline, cached but not in this config
            raise NotCached from None
        raise TloraError(f"{where}: {_one_line(e)}; check --data-config and --data-split") from None
    except FileNotFoundError as e:
        raise NoDataFiles(f"{where}: {_one_line(e)}") from None
    if not stream:
        return Split(rows, False, builder.hash, len(rows))
    split_info = builder.info.splits.get(split) if builder.info.splits else None
    return Split(rows, True, builder.hash, (split_info.num_examples or None) if split_info else None)


def _one_line(error: BaseException) -> str:
    # `datasets` adds a load_dataset() example naming the folder it read, a snapshot's hash for a hub id.
    return " ".join(str(error).split()).split(" Example of usage")[0]
