"""The PEFT adapter directory (SPEC.md, "The adapter directory") and the metadata file beside it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .allocation import ModuleAllocation
from .errors import TloraError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
METADATA = "tlora_metadata.json"


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
        prefix = f"base_model.model.{a.name}"
        tensors[f"{prefix}.lora_A.weight"] = a_matrices[a.name].to("cpu", dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(a.out_features, a.rank, dtype=dtype)
    return tensors


def write_adapter(
    folder: Path,
    allocations: list[ModuleAllocation],
    a_matrices: dict[str, torch.Tensor],
    dtype: torch.dtype,
    base_model: str,
) -> None:
    """Deterministic bytes: same inputs, same files (sorted keys, no timestamps in the adapter)."""
    save_file(adapter_tensors(allocations, a_matrices, dtype), folder / WEIGHTS, metadata={"format": "pt"})
    config = adapter_config(allocations, base_model)
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_metadata(folder: Path, metadata: dict) -> None:
    (folder / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
