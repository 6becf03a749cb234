"""An adapter folder as a starting point for tlora's own trainer (train/): its LoRA weights, the residual a
LoRA-Init or LoRA-TSD adapter takes out of the base, LoRA-Dash's term, and whether A trains."""

from __future__ import annotations

from pathlib import Path

from ..adapter.peft import read_adapter
from ..adapter.sidecar import RESIDUAL_A, read_sidecar, residual_factors
from ..directions import DASH_SIGMA, DASH_U, DASH_VH
from ..train.lora import LoraWeights, Start


def start_from_adapter(folder: Path, train_a: bool | None = None) -> Start:
    """`train_a` None: as the adapter's metadata says (A frozen without metadata), like `load_for_training`."""
    adapter = read_adapter(folder)
    sidecar = read_sidecar(folder)
    weights, residual = {}, {}
    for m in adapter.modules:
        entry = sidecar.get(m.name, {})
        dash = [entry.get(f) for f in (DASH_U, DASH_VH, DASH_SIGMA)] if DASH_U in entry else [None, None, None]
        weights[m.name] = LoraWeights(m.a, m.b, m.scaling, *dash)
        if RESIDUAL_A in entry:
            residual[m.name] = residual_factors(entry, m.name, folder)
    if train_a is None:
        train_a = bool(adapter.metadata.get("train_a", False))
    return Start(weights, residual, train_a)
