"""The export formats, by name. A new format is one module here (its ExportFormat) and one line in FORMATS; the
CLI's --format help and the adapter card's serving block are generated from this table."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..adapter.peft import PeftAdapter
from ..model.checkpoint import DTYPES
from ..options import Options, at_least, one_of, option
from . import lora, merged, padded, residual_base, vllm
from .base import ExportFormat, unconverted

FORMATS: Mapping[str, ExportFormat] = {
    f.name: f for f in (vllm.FORMAT, padded.FORMAT, merged.FORMAT, lora.FORMAT, residual_base.FORMAT)
}


def formats_help() -> str:
    return "; ".join(f"{f.name}: {f.help}" for f in FORMATS.values()) + "."


def serving_facts(adapter: PeftAdapter, folder: Path) -> dict:
    """What each server needs of this adapter, once exported (for CI jobs: `--json`); every value shell-quoted."""
    facts = {name: {"export": shlex.join(["tlora", "export", str(folder), "--format", name])} for name in FORMATS}
    if unconverted(adapter):  # trained first, then made a plain LoRA, which the other formats take
        return {name: facts[name] for name in FORMATS if FORMATS[name].residual}
    top = max(m.rank for m in adapter.modules)
    facts["vllm"]["max_lora_rank"] = vllm.vllm_max_lora_rank(top)
    facts["padded"]["rank"] = padded.unpadded_rank(top)
    return {name: facts[name] for name in FORMATS if not FORMATS[name].residual}


def serving_block() -> str:
    """The lines an adapter card shows under "Serving it", one per format."""
    return "".join(f"{f.serve}\n" for f in FORMATS.values())


@dataclass
class ExportOptions(Options):
    """What `tlora export` writes; each format reads the flags it names in `reads`."""

    format: str = option("vllm", formats_help(), "--format", check=one_of(FORMATS))
    rank: int | None = option(None, "padded: the rank to pad to. Default: the adapter's largest.", check=at_least(1))
    dtype: str = option(
        "auto",
        "auto|float32|bfloat16|float16|float64: the dtype the export is written in (auto: the adapter's; merged and "
        "residual-base: the base's). Scalings are folded in float32 first, so float32 keeps PEFT's numbers exactly.",
        check=one_of(("auto", *DTYPES)),
    )
    initial: Path | None = option(
        None,
        "lora: the adapter `tlora init` wrote, that ADAPTER was trained from (its residual and directions). "
        "Default: ADAPTER's own sidecar, when its trainer kept it.",
    )

    @property
    def torch_dtype(self):
        """None for auto: each format keeps its source's dtype."""
        return None if self.dtype == "auto" else DTYPES[self.dtype]
