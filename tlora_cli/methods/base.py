"""What every init method is made of: the statistics it reads, how it builds A for one module, whether A trains.

A method module (tlora.py, ...) defines one `Method`; methods/__init__.py lists them. Nothing else in the
package names a method: the CLI's flags, the statistics calibration measures and the checks of a calibration
folder all follow from these entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..calib.folder import Calibration
from ..calib.options import CalibrationOptions
from ..calib.statistics import COVARIANCES, Statistics
from ..data import CalibrationSet, DataOptions
from ..distributed import Dist
from ..model.resolve import ModelSource
from ..options import Options, option, positive
from ..progress import Reporter


@dataclass
class DampingOptions(Options):
    """Shared by the methods that invert C (theory) or a Fisher factor (lora-da)."""

    damping: float | None = option(
        None,
        "theory, lora-da: damping added to C (and to the Fisher diagonal). Default 1e-6.",
        check=positive,
        fallback=1e-6,
    )


class Covariances:
    """The covariance of one input at a time on the device: read once, reused by the modules that share it,
    released before the next is read (which may compute a whole layer again)."""

    def __init__(self, stats: Statistics, device: str):
        self.stats, self.device = stats, device
        self.key: str | None = None
        self.value: torch.Tensor | None = None

    def of(self, name: str) -> torch.Tensor:
        key = self.stats.input_of[name]
        if key != self.key:
            self.value = None
            self.key, self.value = key, self.stats.covariances[key].to(self.device)
        return self.value


@dataclass
class ModuleInputs:
    """What a method may read for one module; the weight and covariance are fetched only when asked.
    `options` holds the option classes the method reads, by class; `seed` is the run's --seed; `state` is what
    the method's `prepare` phase left for this module (None without one)."""

    name: str
    rank: int
    alpha: float
    in_features: int
    device: str
    options: dict[type, Options]
    seed: int
    stats: Statistics
    weight_of: Callable[[str], torch.Tensor]
    covariances: Covariances
    state: Any = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def weight(self) -> torch.Tensor:
        return self.weight_of(self.name).to(self.device)

    def covariance(self) -> torch.Tensor:
        return self.covariances.of(self.name)

    def option(self, cls: type, name: str):
        """The value of one of the method's options (its fallback when not given)."""
        return self.options[cls].value(name)


@dataclass
class ModuleInit:
    """One module's start: A (r x in), B (out x r; None: zeros, the output unchanged), and what the adapter's
    sidecar keeps for it (tensors by name: chosen directions, change rates)."""

    a: torch.Tensor
    b: torch.Tensor | None = None
    sidecar: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Preparation:
    """What a method's `prepare` phase may use: the model, the data, the run's settings and ranks."""

    source: ModelSource
    data: DataOptions
    calibration: CalibrationOptions
    rank: int
    alpha: float
    options: dict[type, Options]
    reporter: Reporter
    dist: Dist
    samples: CalibrationSet | None = None  # read already (else the phase reads --data itself)
    model: torch.nn.Module | None = None  # loaded already, on the run's device and dtype


@dataclass
class Prepared:
    """What a `prepare` phase hands on: a Calibration without statistics (targets, data, settings for the metadata),
    how to read each weight, and per module what `build` reads (ModuleInputs.state)."""

    calibration: Calibration
    weight_of: Callable[[str], torch.Tensor]
    state: dict[str, Any]
    side_inits: dict[str, ModuleInit] | None = None  # the second adapter `side_adapter` names, when it names one


@dataclass(frozen=True)
class Method:
    """One init method. `build`: a module's start; `statistics`: the KINDS it reads; `center`: the covariance its
    paper defines (centred per sample, or the uncentred second moment); `options`: the option classes whose flags
    it reads. A method with `prepare` runs that phase instead of calibration (and so allocates no ranks: every
    module gets r_init and alpha); `residual`: its adapter starts non-zero, on W_res = W - s B0 A0, not on W."""

    name: str
    summary: str
    build: Callable[[ModuleInputs], ModuleInit]
    statistics: frozenset[str] = field(default=frozenset({COVARIANCES}))
    center: bool = True
    trains_a: bool = False
    options: tuple[type[Options], ...] = ()
    prepare: Callable[[Preparation], Prepared] | None = None
    residual: bool = False
    changes_model: bool = False  # its adapter starts non-zero on W itself (LoRA-Dash continues the pre-launch LoRA)
    seeded: bool = False  # A is drawn from --seed, which so matters even when init finishes from --calibration
    lr: float = 1e-3  # where `tlora trial`'s rate grid starts for this method (benchmarks/RESULTS-quality.md)
    # A second adapter folder the method can write (its path from the method's options, or None: none asked for)
    side_adapter: Callable[[dict[type, Options]], Path | None] | None = None


def a_only(build_a: Callable[[ModuleInputs], torch.Tensor]) -> Callable[[ModuleInputs], ModuleInit]:
    """The start of a method that builds A alone: B = 0, so the output is unchanged."""
    return lambda m: ModuleInit(build_a(m))
