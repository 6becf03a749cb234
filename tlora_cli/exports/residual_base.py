"""`--format residual-base`: the base a residual adapter (LoRA-Init's) trains on, W_res = W - s B0 A0 for every
adapted module, as a full checkpoint, for trainers that take a base model path (axolotl's `base_model`,
LLaMA-Factory's `model_name_or_path`). Its config.json carries the adapter's residual id, so tlora's training
helper knows not to subtract again."""

from __future__ import annotations

import json

from ..adapter.layout import CARD, SIDECAR
from ..adapter.peft import PeftAdapter
from ..adapter.sidecar import RESIDUAL_A, read_sidecar, residual_factors
from ..directions import residual
from ..errors import TloraError
from ..outputs.card import residual_base_card
from .base import ExportFormat, ExportJob, Written
from .checkpoint import Change, write_checkpoint
from .merged import wrong_base

RESIDUAL_MARK = "tlora_residual"


def residual_entries(adapter: PeftAdapter) -> dict[str, dict]:
    """The residual factors of each module, from the sidecar of an adapter that is residual (its metadata says so)."""
    entries = {name: e for name, e in read_sidecar(adapter.folder).items() if RESIDUAL_A in e}
    if not isinstance(adapter.metadata.get("residual"), dict) or not entries:
        raise TloraError(
            f"{adapter.folder} is not a residual adapter (no residual record and {SIDECAR}): its base is the model "
            "itself; --format residual-base is for adapters of --method lora-init"
        )
    return entries


def write(job: ExportJob) -> Written:
    adapter = job.adapter
    record, entries = adapter.metadata["residual"], residual_entries(adapter)
    changes = {}
    for m in adapter.modules:
        shape = (m.out_features, m.in_features)
        a0, b0, scaling = residual_factors(entries.get(m.name, {}), m.name, adapter.folder, shape)
        changes[f"{m.name}.weight"] = (list(shape), _subtract(a0, b0, scaling))
    advice = "the base's dtype cannot hold W - s B0 A0: write it from a copy of the base saved in float32"
    write_checkpoint(job.base, job.folder, changes, advice, job.on_shard, job.dtype)
    config = json.loads((job.folder / "config.json").read_text())
    config[RESIDUAL_MARK] = {"id": record.get("id"), "adapter": job.adapter.folder.name}
    (job.folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (job.folder / CARD).write_text(residual_base_card(job.out, job.base_hub_id, adapter.metadata, adapter.folder.name))
    hint = (
        f"train {adapter.folder.name} on it: its base_model (axolotl), model_name_or_path (LLaMA-Factory) is {job.out}"
    )
    warnings = wrong_base(job.base, adapter.metadata)
    return Written(len(adapter.modules), max(m.rank for m in adapter.modules), [hint], warnings)


def _subtract(a0, b0, scaling: float) -> Change:
    """W - s B0 A0 in float32, in W's own dtype (the base the adapter trains on; --dtype may widen it after)."""
    return lambda weight: residual(weight, a0, b0, scaling)


FORMAT = ExportFormat(
    "residual-base",
    "the base a residual adapter (lora-init) trains on, W - s B0 A0",
    "tlora export ADAPTER -o BASE --format residual-base  # lora-init: the base to train it on, W - s B0 A0",
    write,
    kind="merged",
    reads=frozenset({"model", "revision"}),
    residual=True,
    check=residual_entries,
)
