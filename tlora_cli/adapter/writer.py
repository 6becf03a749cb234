"""The PEFT adapter directory (SPEC.md, "The adapter directory") and the metadata file beside it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..allocation import ModuleAllocation, check_allocations_finite
from ..errors import TloraError
from ..jsonio import dump
from .layout import CONFIG, METADATA, WEIGHTS
from .peft import tensor_key


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


def adapter_tensors(
    allocations: list[ModuleAllocation], a_matrices: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    tensors = {}
    for a in allocations:
        if not a.rank:
            continue
        tensors[tensor_key(a.name, "A")] = a_matrices[a.name].to("cpu", dtype).contiguous()
        tensors[tensor_key(a.name, "B")] = torch.zeros(a.out_features, a.rank, dtype=dtype)
    return tensors


def check_finite(
    allocations: list[ModuleAllocation], a_matrices: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]
) -> None:
    """The gate before anything is written: a NaN or inf anywhere makes PEFT output NaN."""
    check_allocations_finite(allocations)
    for a in allocations:
        if not a.rank:
            continue
        if not bool(torch.isfinite(a_matrices[a.name]).all()):
            raise TloraError(
                f"the A matrix of {a.name} holds NaN or inf values: change --damping, --lora-da-beta or "
                "--lora-da-population (lora-da), or recalibrate"
            )
        if not bool(torch.isfinite(tensors[tensor_key(a.name, "A")]).all()):
            raise TloraError(f"the A matrix of {a.name} overflows the adapter's dtype: pass --dtype float32")


def write_adapter(
    folder: Path,
    allocations: list[ModuleAllocation],
    a_matrices: dict[str, torch.Tensor],
    dtype: torch.dtype,
    base_model: str,
) -> None:
    """Deterministic bytes: same inputs, same files (sorted keys, no timestamps in the adapter)."""
    tensors = adapter_tensors(allocations, a_matrices, dtype)
    check_finite(allocations, a_matrices, tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    config = adapter_config(allocations, base_model)
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_metadata(folder: Path, metadata: dict) -> None:
    try:
        text = dump(metadata)
    except ValueError as e:  # a NaN or inf that no gate before caught: refuse rather than write invalid JSON
        raise TloraError(f"the adapter's metadata holds a number that is not finite ({e}): recalibrate") from e
    (folder / METADATA).write_text(text)
