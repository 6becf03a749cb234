"""The init methods, one table: how each builds A for a module, which statistics it reads, whether A trains.

A new method is one entry in METHODS plus its math (factorisation.py); the CLI lists and checks methods
from the table, calibration measures what the entry says it reads.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .calib.statistics import GRADIENT_KINDS, Statistics
from .errors import TloraError
from .factorisation import lora_da_a, random_a, theory_a, tlora_a, w_svd_a


@dataclass
class InitOptions:
    """How A is built. train_a=None: the method's own recipe (A trained for random, frozen otherwise)."""

    method: str = "tlora"
    damping: float = 1e-6
    train_a: bool | None = None
    seed: int = 0
    lora_da_beta: float = 0.03  # the released LoRA-DA config's weight on the variance term
    lora_da_population: int = 100_000  # N: the size of the fine-tuning set, not of the calibration set
    recipe: str = "default"

    def check(self) -> None:
        if self.recipe == "released" and self.method != "tlora":
            raise TloraError(f"--recipe released reproduces TLoRA's released code: drop --method {self.method}")
        if self.method not in METHODS:
            raise TloraError(f"--method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not self.damping > 0:
            raise TloraError(f"--damping must be positive, got {self.damping:g}")
        if self.lora_da_beta < 0 or self.lora_da_population < 1:
            raise TloraError("--lora-da-beta must be >= 0 and --lora-da-population >= 1")

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @property
    def trains_a(self) -> bool:
        """The released code trains A with B (get_peft_model makes every lora_ weight trainable)."""
        if self.train_a is not None:
            return self.train_a
        return self.spec.trains_a or self.recipe == "released"

    def recorded(self) -> dict:
        """The options the method reads, for the metadata."""
        return {name: getattr(self, name) for name in self.spec.options}


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
    """What an A function may read for one module; the weight and covariance are fetched only when asked."""

    name: str
    rank: int
    in_features: int
    device: str
    options: InitOptions
    stats: Statistics
    weight_of: Callable[[str], torch.Tensor]
    covariances: Covariances

    def weight(self) -> torch.Tensor:
        return self.weight_of(self.name).to(self.device)

    def covariance(self) -> torch.Tensor:
        return self.covariances.of(self.name)


@dataclass(frozen=True)
class Method:
    """One init method. `covariances`/`gradients`: the statistics it reads; `center`: the covariance its paper
    defines (centred per sample, or the uncentred second moment); `options`: InitOptions fields it reads."""

    name: str
    summary: str
    build_a: Callable[[ModuleInputs], torch.Tensor]
    covariances: bool = True
    gradients: bool = False
    center: bool = True
    trains_a: bool = False
    options: tuple[str, ...] = ()


def check_gradients(stats: Statistics) -> None:
    if any(kind not in stats.tensors for kind in GRADIENT_KINDS):
        raise TloraError(
            "--method lora-da needs gradient statistics: calibrate with `tlora calibrate --gradients`, "
            "or run `tlora init --method lora-da` without --calibration"
        )


def _random(m: ModuleInputs) -> torch.Tensor:
    seed = zlib.crc32(f"{m.options.seed}:{m.name}".encode())  # per module: independent of order
    return random_a(m.in_features, m.rank, torch.Generator().manual_seed(seed))


def _lora_da(m: ModuleInputs) -> torch.Tensor:
    check_gradients(m.stats)
    cov = m.covariance()
    grad, out_sq = (m.stats.tensors[kind][m.name].to(m.device) for kind in GRADIENT_KINDS)
    o = m.options
    try:
        return lora_da_a(cov, out_sq, grad, m.rank, o.lora_da_beta, o.lora_da_population, o.damping)
    except ValueError as e:
        raise TloraError(f"LoRA-DA cannot initialise {m.name}: {e}") from e


METHODS: Mapping[str, Method] = {
    m.name: m
    for m in (
        Method("tlora", "SVD of W C", lambda m: tlora_a(m.weight(), m.covariance(), m.rank)),
        Method("w-svd", "SVD of W alone", lambda m: w_svd_a(m.weight(), m.rank), covariances=False),
        Method("random", "standard LoRA", _random, covariances=False, trains_a=True),
        Method(
            "theory",
            "V_r^T C^-1/2",
            lambda m: theory_a(m.weight(), m.covariance(), m.rank, m.options.damping),
            options=("damping",),
        ),
        Method(
            "lora-da",
            "LoRA-DA's Fisher-aware subspace, docs/lora-da.md",
            _lora_da,
            gradients=True,
            center=False,  # LoRA-DA's K-FAC factor E[x x^T] is the uncentred second moment
            options=("damping", "lora_da_beta", "lora_da_population"),
        ),
    )
}


def methods_help() -> str:
    return ", ".join(f"{m.name} ({m.summary})" for m in METHODS.values()) + "."
