"""What `tlora trial` tries: the methods, the rates, and the size of each short fine-tune."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..methods import METHODS
from ..options import Options, at_least, option

DEFAULT_METHODS = "tlora,random,w-svd"
WARMUP_SHARE = 0.05  # of the steps, as benchmarks/quality/run.py (10 of 200)
CLIP = 1.0  # the gradients' largest norm, as benchmarks/quality/run.py


def names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _methods(value: str) -> str | None:
    chosen = names(value)
    if not chosen:
        return "is empty: give comma-separated method names"
    unknown = [name for name in chosen if name not in METHODS]
    if unknown:
        return f"names {unknown[0]!r}, which is no method; pick from {', '.join(METHODS)}"
    if len(set(chosen)) != len(chosen):
        return "names a method twice"
    return None


def rates(value: str) -> list[float] | None:
    """The rates of a fixed list, or None for auto; ValueError for anything else."""
    if value.strip() == "auto":
        return None
    parsed = [float(v) for v in names(value)]
    if not parsed or not all(math.isfinite(r) and r > 0 for r in parsed):
        raise ValueError(value)
    return sorted(set(parsed))


def _lrs(value: str) -> str | None:
    try:
        rates(value)
    except ValueError:
        return f"must be auto or comma-separated positive rates like 1e-4,2e-4; got {value!r}"
    return None


@dataclass
class TrialOptions(Options):
    methods: str = option(
        DEFAULT_METHODS, f"Comma-separated init methods to try, from: {', '.join(METHODS)}.", check=_methods
    )
    lrs: str = option(
        "auto",
        "auto: each method's own rate with half and twice it, widened (up to twice per side) where the best sits on "
        "an edge; or comma-separated rates for every method.",
        check=_lrs,
    )
    steps: int = option(
        50, "Optimizer steps of each short fine-tune (AdamW, warm-up, linear decay).", check=at_least(1)
    )
    trial_batch_size: int = option(2, "Samples per fine-tune step.", check=at_least(1))
    eval_samples: int = option(
        64, "Held-out samples carved from --data: never calibrated, pre-launched or trained on.", check=at_least(1)
    )

    @property
    def method_names(self) -> list[str]:
        return names(self.methods)

    @property
    def warmup(self) -> int:
        return max(1, round(WARMUP_SHARE * self.steps))
