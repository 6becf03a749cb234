"""What every export format shares: the job it is given, what it reports, and the LoRA adapter a server reads.

Servers apply one scaling to every module: vLLM reads `r`, `lora_alpha` and `use_rslora` only and ignores
`alpha_pattern`; SGLang refuses patterns that change a module's rank or alpha; LoRAX and TGI stack every
module of a type and need one rank per type. So the adapter formats fold the module's own scaling
s_i = alpha_i / r_i into B (in float32, then the adapter's dtype) and write a config whose single scaling is 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapter.gate import check_written
from ..adapter.layout import CONFIG, METADATA, WEIGHTS
from ..adapter.peft import PeftAdapter
from ..adapter.sidecar import RESIDUAL_A, read_sidecar
from ..directions import DASH_U
from ..jsonio import dump
from ..model.resolve import ModelOptions
from ..names import published
from ..outputs.card import write_card


@dataclass
class ExportJob:
    """One export: the adapter read (with its tensors), the temp folder to fill, the final OUT, the flags (`rank`
    for padded, `initial` for lora, `model` for the formats that read the base) and, for those, the base folder
    resolved before OUT was checked (it is an input OUT may not be, contain or lie in) and its hub id."""

    adapter: PeftAdapter
    folder: Path
    out: Path
    model: ModelOptions
    rank: int | None = None
    initial: Path | None = None
    dtype: torch.dtype | None = None  # None: the source's own
    command: str | None = None
    on_shard: Callable[[str], None] | None = None
    base: Path | None = None
    base_hub_id: str | None = None


@dataclass
class Written:
    """What an export wrote, for the one-line summary and the hints printed after it."""

    modules: int
    rank: int
    hints: list[str]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExportFormat:
    """One `--format`. `reads`: the export flags it takes beyond --format (the others are refused with it);
    `serve`: its line in an adapter card's "Serving it" block; `kind`: what ownership calls its output;
    `residual`: whether it takes a residual adapter (LoRA-Init's, whose base is not the model) at all; `check`:
    what it refuses of an adapter, run before a base model is resolved (or downloaded)."""

    name: str
    help: str
    serve: str
    write: Callable[[ExportJob], Written]
    kind: str = "adapter"
    reads: frozenset[str] = frozenset()
    residual: bool = False
    check: Callable[[PeftAdapter], object] | None = None


def base_config(config: dict) -> dict:
    """The original config with the scaling fields every adapter format rewrites."""
    out = dict(config)
    out["use_rslora"] = False
    out["inference_mode"] = True
    return out


def write_lora(
    job: ExportJob,
    fmt: str,
    config: dict,
    tensors: dict[str, torch.Tensor],
    note: str,
    drop: tuple[str, ...] = (),
    initial: Path | None = None,
) -> None:
    """An adapter export's files: weights, config, tlora's metadata (when the adapter has it; without the `drop`
    fields, which no longer hold) with how the export was made, and a card that says what `fmt` did (`note`)."""
    check_written(tensors, WEIGHTS, "check the adapter, and the training that saved it")
    save_file(tensors, job.folder / WEIGHTS, metadata={"format": "pt"})
    (job.folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    export = {"format": fmt, "from": published(str(job.adapter.folder.resolve())), "rank": config["r"]}
    if initial is not None:
        export["initial"] = published(str(initial.resolve()))
    meta = {k: v for k, v in job.adapter.metadata.items() if k not in drop}
    (job.folder / METADATA).write_text(dump({**meta, "export": export}))
    write_card(job.folder, job.command, name=job.out.name, export_note=note)


def unconverted(adapter: PeftAdapter) -> str | None:
    """What an adapter holds beyond a plain LoRA on its base, in words; None for a plain LoRA."""
    sidecar = read_sidecar(adapter.folder)
    if adapter.metadata.get("residual") or any(RESIDUAL_A in e for e in sidecar.values()):
        return "a residual adapter: its base is W_res = W - s B0 A0, not the model"
    if any(DASH_U in e for e in sidecar.values()):
        return "a LoRA-Dash adapter: its Dash term lives in its sidecar, which servers do not read"
    return None
