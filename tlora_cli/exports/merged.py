"""`--format merged`: W + s_i B_i A_i for every adapted module, a full checkpoint of the base (checkpoint.py)."""

from __future__ import annotations

import shlex
from pathlib import Path

from ..adapter.layout import CARD, CONFIG
from ..adapter.peft import LoraModule, PeftAdapter
from ..errors import TloraError
from ..model.builtin import BUILTIN_HUB_ID, builtin_model_path
from ..model.checkpoint import Checkpoint
from ..model.resolve import ModelOptions, base_hub_id, resolve_model
from ..outputs.card import merged_card
from .base import ExportFormat, ExportJob, Written
from .checkpoint import Change, write_checkpoint


def write(job: ExportJob) -> Written:
    modules = job.adapter.modules
    changes = {f"{m.name}.weight": ([m.out_features, m.in_features], _merge(m)) for m in modules}
    advice = "the base's dtype cannot hold W + s B A: merge into a copy of the base saved in float32"
    write_checkpoint(job.base, job.folder, changes, advice, job.on_shard, job.dtype)
    meta = job.adapter.metadata
    (job.folder / CARD).write_text(merged_card(job.out, job.base_hub_id, meta, job.adapter.folder.name))
    hint = f"serve it like any model: vllm serve {shlex.quote(str(job.out))}"
    return Written(len(modules), max(m.rank for m in modules), [hint], wrong_base(job.base, meta))


def wrong_base(base: Path, meta: dict) -> list[str]:
    """The warning for a base that is not the model the adapter was calibrated on (its fingerprint differs)."""
    calibrated = calibrated_on(meta).get("fingerprint")
    if calibrated and Checkpoint(base).fingerprint != calibrated:
        return [f"{base} is not the model this adapter was calibrated on (its weights differ): written anyway"]
    return []


def calibrated_on(meta: dict) -> dict:
    """The metadata's record of the model the adapter was calibrated on; {} when there is none (or not an object)."""
    record = meta.get("model")
    return record if isinstance(record, dict) else {}


def _merge(m: LoraModule) -> Change:
    """W + s B A, computed in float32 (the writer casts it)."""
    return lambda weight: weight.float() + m.delta()


def merged_base(adapter: PeftAdapter, model: ModelOptions) -> tuple[Path, str | None]:
    """The base model folder a merge reads, and its hub id: --model; else `base_model_name_or_path` (a folder or a
    hub id; the built-in model's hub id means the built-in copy)."""
    if model.model is not None:
        path = resolve_model(model.model, model.revision)
        return path, base_hub_id(model.model, path)
    named = adapter.config.get("base_model_name_or_path")
    if named == BUILTIN_HUB_ID and model.revision is None:
        path = builtin_model_path()
    elif isinstance(named, str) and named:
        path = resolve_model(named, model.revision)
    else:
        raise TloraError(f"{adapter.folder / CONFIG} names no base model: pass it with --model")
    return path, base_hub_id(named if isinstance(named, str) else None, path)


FORMAT = ExportFormat(
    "merged",
    "a full checkpoint W + s B A, shard by shard",
    "tlora export ADAPTER -o MERGED --format merged          # servers without LoRA: W + s B A",
    write,
    kind="merged",
    reads=frozenset({"model", "revision"}),
)
