"""What calibration runs on and measures (`tlora calibrate`, `tlora init`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..model.checkpoint import DTYPES
from ..options import Options, at_least, existing_folder, not_blank, one_of, option
from ..recipe import DEFAULT_NUM_SAMPLES, RELEASED_NUM_SAMPLES
from .statistics import COVARIANCES, KINDS

ENGINES = ("auto", "stream", "whole")


def _device(value: str) -> str | None:
    if value in ("auto", "cpu") or value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        return None
    return f"must be cpu or cuda (or cuda:N), got {value!r}"


@dataclass
class CalibrationOptions(Options):
    """None: the default (num_samples: the recipe's, 32; center: the method's; batch_size: the largest that fits).

    `statistics` is what the method asks for (KINDS names), set by the library, never by a flag.
    """

    num_samples: int | None = option(
        None,
        f"Calibration samples N. Default {DEFAULT_NUM_SAMPLES} ({RELEASED_NUM_SAMPLES} with --recipe released).",
        check=at_least(1),
    )
    seq_len: int = option(512, "Tokens per sample at most, T.", check=at_least(2))
    target_modules: str | None = option(
        None, "Comma-separated module name suffixes. Default: all attention and MLP projections.", check=not_blank
    )
    center: bool | None = option(
        None,
        "Centre each sample's inputs (C = Cov[X], SPEC.md) or keep the uncentred second moment. "
        "Default: the method's own (centred; uncentred for lora-da and `calibrate --gradients`).",
        "--center/--no-center",
    )
    device: str | None = option(None, "cpu or cuda. Default: cuda when available.", check=_device)
    dtype: str = option(
        "auto",
        "auto|float32|bfloat16|float16|float64: the model's compute dtype and the adapter's dtype "
        "(auto: float32 on CPU, the checkpoint's on GPU; the adapter in the checkpoint's).",
        check=one_of(("auto", *DTYPES)),
    )
    seed: int = option(0, "Seed of the sample selection (and of random A).")
    engine: str = option(
        "auto",
        "auto: whole if the model, its statistics and a batch fit in free memory, else stream; "
        "stream: one decoder layer on the device at a time; whole: the model in memory at once.",
        check=one_of(ENGINES),
    )
    batch_size: int | None = option(
        None,
        "Samples run at once (each keeps its own importance score). Default: the most that fit, up to 8, on a "
        "GPU; 1 on CPU.",
        check=at_least(1),
    )
    read_ahead: bool = option(
        True, "Stream engine: read the next layer from disk while one computes (timings: load_wait)."
    )
    offload_dir: Path | None = option(
        None,
        "Keep layer inputs, gradients and covariances in files here instead of host memory.",
        check=existing_folder,
    )
    statistics: frozenset[str] = field(default=frozenset({COVARIANCES}))

    @property
    def samples(self) -> int:
        """N (the recipe resolves None before calibration; a library caller gets the default)."""
        return self.num_samples if self.num_samples is not None else DEFAULT_NUM_SAMPLES

    @property
    def centred(self) -> bool:
        return self.center is not False


@dataclass
class MeasureOptions(Options):
    """What `tlora calibrate` measures beyond the covariances and scores every method reads."""

    gradients: bool = option(False, "Also save the gradient statistics that `--method lora-da` needs.", "--gradients")

    @property
    def kinds(self) -> frozenset[str]:
        extra = {k for k, kind in KINDS.items() if kind.from_gradient is not None} if self.gradients else set()
        return frozenset({COVARIANCES, *extra})

    @property
    def default_center(self) -> bool:
        """Gradient statistics are read by LoRA-DA alone, whose K-FAC factor is the uncentred second moment."""
        return not self.gradients
