"""The export formats, by name. A new format is one module here (its ExportFormat) and one line in FORMATS; the
CLI's --format help and the adapter card's serving block are generated from this table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..options import Options, at_least, one_of, option
from . import lora, merged, padded, residual_base, vllm
from .base import ExportFormat

FORMATS: Mapping[str, ExportFormat] = {
    f.name: f for f in (vllm.FORMAT, padded.FORMAT, merged.FORMAT, lora.FORMAT, residual_base.FORMAT)
}


def formats_help() -> str:
    return "; ".join(f"{f.name}: {f.help}" for f in FORMATS.values()) + "."


def serving_block() -> str:
    """The lines an adapter card shows under "Serving it", one per format."""
    return "".join(f"{f.serve}\n" for f in FORMATS.values())


@dataclass
class ExportOptions(Options):
    format: str = option("vllm", formats_help(), "--format", check=one_of(FORMATS))
    rank: int | None = option(None, "padded: the rank to pad to. Default: the adapter's largest.", check=at_least(1))
    initial: Path | None = option(
        None,
        "lora: the adapter `tlora init` wrote, that ADAPTER was trained from (its residual and directions). "
        "Default: ADAPTER's own sidecar, when its trainer kept it.",
    )
