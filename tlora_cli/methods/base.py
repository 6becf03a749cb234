"""What every init method is made of: the statistics it reads, how it builds A for one module, whether A trains.

A method module (tlora.py, ...) defines one `Method`; methods/__init__.py lists them. Nothing else in the
package names a method: the CLI's flags, the statistics calibration measures and the checks of a calibration
folder all follow from these entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..calib.statistics import COVARIANCES, Statistics
from ..options import Options, option, positive


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
    """What an A function may read for one module; the weight and covariance are fetched only when asked.
    `options` holds the option classes the method reads, by class; `seed` is the run's --seed."""

    name: str
    rank: int
    in_features: int
    device: str
    options: dict[type, Options]
    seed: int
    stats: Statistics
    weight_of: Callable[[str], torch.Tensor]
    covariances: Covariances

    def weight(self) -> torch.Tensor:
        return self.weight_of(self.name).to(self.device)

    def covariance(self) -> torch.Tensor:
        return self.covariances.of(self.name)

    def option(self, cls: type, name: str):
        """The value of one of the method's options (its fallback when not given)."""
        return self.options[cls].value(name)


@dataclass(frozen=True)
class Method:
    """One init method. `statistics`: the KINDS it reads; `center`: the covariance its paper defines (centred per
    sample, or the uncentred second moment); `options`: the option classes whose flags it reads."""

    name: str
    summary: str
    build_a: Callable[[ModuleInputs], torch.Tensor]
    statistics: frozenset[str] = field(default=frozenset({COVARIANCES}))
    center: bool = True
    trains_a: bool = False
    options: tuple[type[Options], ...] = ()
