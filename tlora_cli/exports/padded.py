"""`--format padded`: each module's scaling folded into B and every A and B zero-padded to one rank, with no
rank or alpha patterns at all (SGLang, TGI, LoRAX). The padded rows of A and columns of B are zero, so B A is
unchanged."""

from __future__ import annotations

import torch

from ..adapter.peft import tensor_key
from ..errors import TloraError
from .base import ExportFormat, ExportJob, Written, base_config, write_lora


def write(job: ExportJob) -> Written:
    modules = job.adapter.modules
    top = max(m.rank for m in modules)
    rank = top if job.rank is None else job.rank
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
    config.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={})
    tensors = {}
    for m in modules:
        a = torch.zeros(rank, m.in_features, dtype=m.a.dtype)
        a[: m.rank] = m.a
        b = torch.zeros(m.out_features, rank, dtype=m.b.dtype)
        b[:, : m.rank] = m.scaled_b()
        tensors[tensor_key(m.name, "A")] = a
        tensors[tensor_key(m.name, "B")] = b
    note = (
        f"each module's scaling is folded into B and every A and B is zero-padded to rank {rank}, with no rank or "
        "alpha patterns: SGLang, TGI and LoRAX load it as a plain LoRA adapter."
    )
    write_lora(job, "padded", config, tensors, note)
    return Written(
        len(modules), rank, [f"every module has rank {rank}, scaling 1 (lora_alpha = r = {rank}) and no patterns"]
    )


FORMAT = ExportFormat(
    "padded",
    "also one rank, no patterns (SGLang, TGI, LoRAX)",
    "tlora export ADAPTER -o ADAPTER-padded --format padded  # SGLang, TGI, LoRAX: one rank, no patterns",
    write,
    reads=frozenset({"rank"}),
)
