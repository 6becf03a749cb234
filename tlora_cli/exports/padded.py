"""`--format padded`: each module's scaling folded into B, every A and B zero-padded to one rank, no rank or alpha
patterns (SGLang, TGI, LoRAX), and every target module of every layer present.

LoRAX and TGI stack a module type over the layers and drop the whole type when one layer lacks it (with only a
warning), so a module the allocation left at rank 0 is written with A = B = 0. They also pad each type's rank (to
8 x TP, else to a multiple of 16) and then read the adapter's r as the padded one for the types after the first:
the default rank is therefore one that needs no padding, 8 or a multiple of 16 (pass --rank for TP > 1). The
padded rows of A and columns of B are zero, so B A is unchanged."""

from __future__ import annotations

import math
import re

import torch

from ..adapter.peft import PeftAdapter, tensor_key
from ..errors import TloraError
from .base import ExportFormat, ExportJob, Written, base_config, write_lora

LAYER = re.compile(r"^(?P<before>.*?)\.(?P<layer>\d+)\.(?P<after>.+)$")
SGMV_BLOCK, MIN_SGMV_RANK = 16, 8  # LoRAX/TGI's padding (utils/punica.py)


def unpadded_rank(top: int) -> int:
    """The smallest rank >= `top` that LoRAX and TGI leave as it is at TP 1: 8, or a multiple of 16."""
    return MIN_SGMV_RANK if top <= MIN_SGMV_RANK else SGMV_BLOCK * math.ceil(top / SGMV_BLOCK)


def absent_modules(adapter: PeftAdapter) -> dict[str, tuple[int, int]]:
    """Target modules the adapter has no weights for, with their (out, in): the rank-0 modules tlora's metadata
    lists, and every (layer, type) that some layer has and another lacks, where that type has one shape."""
    present = {m.name for m in adapter.modules}
    absent = {
        m["name"]: tuple(m["shape"])
        for m in adapter.metadata.get("modules", [])
        if isinstance(m, dict) and not m.get("rank") and m.get("name") not in present
    }
    shapes: dict[tuple[str, str], set[tuple[int, int]]] = {}
    layers: dict[str, set[str]] = {}
    for m in adapter.modules:
        found = LAYER.match(m.name)
        if found:
            shapes.setdefault((found["before"], found["after"]), set()).add((m.out_features, m.in_features))
            layers.setdefault(found["before"], set()).add(found["layer"])
    for (before, after), seen in shapes.items():
        for layer in layers[before]:
            name = f"{before}.{layer}.{after}"
            if name not in present and name not in absent and len(seen) == 1:
                absent[name] = next(iter(seen))
    return absent


def write(job: ExportJob) -> Written:
    modules = job.adapter.modules
    top = max(m.rank for m in modules)
    rank = unpadded_rank(top) if job.rank is None else job.rank
    if rank < top:
        raise TloraError(f"--rank {rank} is below the adapter's largest rank {top}: pass --rank {top} or more")
    # A rank above min(out, in) adds nothing a module can use; bounded before any zeros are allocated.
    limit = max(top, *(min(m.out_features, m.in_features) for m in modules))
    if rank > limit:
        raise TloraError(
            f"--rank {rank} is above {limit}, the largest rank a module of this adapter can have (min(out, in) of its "
            f"widest module): pass --rank between {top} and {limit}"
        )
    config = base_config(job.adapter.config)
    absent = absent_modules(job.adapter)
    config.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={})
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted({*config["target_modules"], *absent})
    tensors = {}
    for m in modules:
        a = torch.zeros(rank, m.in_features, dtype=job.dtype or m.a.dtype)
        a[: m.rank] = m.a
        b = torch.zeros(m.out_features, rank, dtype=job.dtype or m.b.dtype)
        b[:, : m.rank] = m.scaled_b(job.dtype)
        tensors[tensor_key(m.name, "A")], tensors[tensor_key(m.name, "B")] = a, b
    dtype = job.dtype or modules[0].a.dtype
    for name, (out_features, in_features) in absent.items():
        tensors[tensor_key(name, "A")] = torch.zeros(rank, in_features, dtype=dtype)
        tensors[tensor_key(name, "B")] = torch.zeros(out_features, rank, dtype=dtype)
    note = (
        f"each module's scaling is folded into B and every A and B is zero-padded to rank {rank}, with no rank or "
        "alpha patterns, and every target module of every layer present (zeros where the adapter has none): "
        "SGLang, TGI and LoRAX load it as a plain LoRA adapter and keep every module type."
    )
    write_lora(job, "padded", config, tensors, note)
    hint = f"every module has rank {rank}, scaling 1 (lora_alpha = r = {rank}) and no patterns"
    if absent:
        hint += f"; {len(absent)} modules the adapter leaves out are written as zeros, so no server drops their type"
    return Written(len(modules) + len(absent), rank, [hint])


FORMAT = ExportFormat(
    "padded",
    "also one rank (8 or a multiple of 16 by default), no patterns, every module of every layer (SGLang, TGI, LoRAX)",
    "tlora export ADAPTER -o ADAPTER-padded --format padded  # SGLang, TGI, LoRAX: one rank, no patterns",
    write,
    reads=frozenset({"rank"}),
)
