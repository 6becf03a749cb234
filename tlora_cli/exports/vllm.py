"""`--format vllm`: each module's scaling folded into B, per-module ranks kept (vLLM pads its buffers to
--max-lora-rank); `lora_alpha = r` and every pattern alpha equal to its rank, so every reader, PEFT included,
scales by exactly 1."""

from __future__ import annotations

import shlex

from ..adapter.peft import tensor_key
from .base import ExportFormat, ExportJob, Written, base_config, write_lora

# vLLM's --max-lora-rank accepts these values only (vllm/config/lora.py).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds `rank` (None above its largest)."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def write(job: ExportJob) -> Written:
    modules = job.adapter.modules
    top = max(m.rank for m in modules)
    config = base_config(job.adapter.config)
    config.update(r=top, lora_alpha=top)
    # PEFT needs the ranks to build the layers and, without a pattern alpha equal to each rank, would
    # scale a module by top / r_i; vLLM ignores both patterns and scales by lora_alpha / r = 1.
    config["rank_pattern"] = {m.name: m.rank for m in modules if m.rank != top}
    config["alpha_pattern"] = dict(config["rank_pattern"])
    tensors = {}
    for m in modules:
        tensors[tensor_key(m.name, "A")] = m.a.to(job.dtype or m.a.dtype).contiguous()
        tensors[tensor_key(m.name, "B")] = m.scaled_b(job.dtype)
    max_rank = vllm_max_lora_rank(top)
    note = (
        f"each module's scaling alpha_i / r_i is folded into B and `lora_alpha = r = {top}`, so vLLM's single "
        "scaling is exact; per-module ranks are kept. Serve it with `vllm serve BASE --enable-lora "
        f"--max-lora-rank {max_rank or top} --lora-modules NAME=PATH`."
    )
    write_lora(job, "vllm", config, tensors, note)
    # Every value from a file or a path is quoted: a crafted base_model_name_or_path must not run in the user's shell.
    base = shlex.quote(str(config.get("base_model_name_or_path") or "BASE_MODEL"))
    if max_rank is None:
        hint = f"its largest rank {top} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})"
    else:
        hint = (
            f"pass --max-lora-rank {max_rank}: vllm serve {base} --enable-lora --max-lora-rank {max_rank} "
            f"--lora-modules {shlex.quote(f'{job.out.name}={job.out}')}"
        )
    return Written(len(modules), top, [hint])


FORMAT = ExportFormat(
    "vllm",
    "scalings folded into B, per-module ranks kept",
    "tlora export ADAPTER -o ADAPTER-vllm --format vllm      # vLLM: scalings folded into B, ranks kept",
    write,
    reads=frozenset({"dtype"}),
)
