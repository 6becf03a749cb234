"""The PEFT adapter directory (SPEC.md, "The adapter directory") and the metadata file beside it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..allocation import ModuleAllocation, check_allocations_finite
from ..errors import TloraError
from ..jsonio import dump
from ..methods.base import ModuleInit
from .gate import cast, check_scaling
from .layout import CONFIG, METADATA, WEIGHTS
from .peft import tensor_key
from .sidecar import RESIDUAL_A, RESIDUAL_B, RESIDUAL_SCALING, write_sidecar


def adapter_config(allocations: list[ModuleAllocation], base_model: str) -> dict:
    """A plain LoraConfig: full module names everywhere, so PEFT's suffix/regex matching is unambiguous."""
    active = [a for a in allocations if a.rank]
    if not active:
        raise TloraError("every module got rank 0: raise --budget-rank")
    top = max(active, key=lambda a: a.rank)  # first of the largest, in model order
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": top.rank,
        "lora_alpha": top.alpha,
        "target_modules": [a.name for a in active],
        "rank_pattern": {a.name: a.rank for a in active},
        "alpha_pattern": {a.name: a.alpha for a in active},
        "init_lora_weights": True,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


# What to change when a factor the method built holds a NaN or inf.
DIVERGED = "change --damping, --lora-da-beta or --lora-da-population (lora-da), lower --prelaunch-lr, or recalibrate"


def adapter_tensors(
    allocations: list[ModuleAllocation], inits: dict[str, ModuleInit], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A and B of every adapted module in the adapter's dtype, through the tensor gate (gate.py): a NaN or inf, a
    value beyond the dtype or a scaling that overflows it is refused before anything is written."""
    check_allocations_finite(allocations)
    tensors = {}
    for a in allocations:
        if not a.rank:
            continue
        start = inits[a.name]
        b = torch.zeros(a.out_features, a.rank) if start.b is None else start.b
        for part, value in (("A", start.a), ("B", b)):
            if not bool(torch.isfinite(value).all()):
                raise TloraError(f"the {part} matrix of {a.name} holds NaN or inf values: {DIVERGED}")
            name = f"the {part} matrix of {a.name}"
            tensors[tensor_key(a.name, part)] = cast(value.to("cpu"), dtype, name, "pass --dtype float32").contiguous()
        check_scaling(a.name, a.scaling, b, dtype, "--alpha (or the plan's alpha)")
    return tensors


def write_adapter(
    folder: Path,
    allocations: list[ModuleAllocation],
    inits: dict[str, ModuleInit],
    dtype: torch.dtype,
    base_model: str,
    residual: bool = False,
) -> None:
    """Deterministic bytes: same inputs, same files (sorted keys, no timestamps in the adapter). A `residual`
    adapter's sidecar keeps the factors as written (A0, B0 in the adapter's dtype) and s: W_res = W - s B0 A0."""
    tensors = adapter_tensors(allocations, inits, dtype)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    config = adapter_config(allocations, base_model)
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    entries = {a.name: dict(inits[a.name].sidecar) for a in allocations if a.rank}
    if residual:
        for a in allocations:
            if a.rank:
                entries[a.name][RESIDUAL_A] = tensors[tensor_key(a.name, "A")]
                entries[a.name][RESIDUAL_B] = tensors[tensor_key(a.name, "B")]
                entries[a.name][RESIDUAL_SCALING] = torch.tensor(a.scaling, dtype=torch.float64)
    write_sidecar(folder, {name: fields for name, fields in entries.items() if fields})


def write_metadata(folder: Path, metadata: dict) -> None:
    try:
        text = dump(metadata)
    except ValueError as e:  # a NaN or inf that no gate before caught: refuse rather than write invalid JSON
        raise TloraError(f"the adapter's metadata holds a number that is not finite ({e}): recalibrate") from e
    (folder / METADATA).write_text(text)
