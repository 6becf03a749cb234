"""LoRA-DA's Fisher-aware subspace from K-FAC statistics and the mean gradient (docs/lora-da.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calib.statistics import COVARIANCES
from ..errors import TloraError
from ..factorisation import DampingScale, lora_da_a
from ..options import Options, at_least, display, finite_non_negative, option
from .base import DampingOptions, Method, ModuleInputs, a_only

GRADIENT_STATISTICS = ("mean_grads", "output_grad_sq")


@dataclass
class LoraDaOptions(Options):
    lora_da_beta: float | None = option(
        None,
        "lora-da: weight of the variance term (released config: 0.03). Default 0.03.",
        check=finite_non_negative,
        fallback=0.03,
    )
    lora_da_population: int | None = option(
        None,
        "lora-da: N, the number of fine-tuning examples. Default 100000.",
        check=at_least(1),
        fallback=100_000,
    )


def build_a(m: ModuleInputs) -> torch.Tensor:
    cov = m.covariance()
    grad, out_sq = (m.stats.tensors[kind][m.name].to(m.device) for kind in GRADIENT_STATISTICS)
    beta, population = m.option(LoraDaOptions, "lora_da_beta"), m.option(LoraDaOptions, "lora_da_population")
    damping = m.option(DampingOptions, "damping")
    try:
        return lora_da_a(cov, out_sq, grad, m.rank, beta, population, damping)
    except DampingScale as e:
        too, instead = ("large", "smaller") if e.too_large else ("small", "larger")
        raise TloraError(
            f"{display(DampingOptions, 'damping')} {damping:g} is too {too} for the covariance of {m.name} (largest "
            f"eigenvalue {e.largest:.3g}): LoRA-DA's step leaves float64's range; give a {instead} one (default 1e-6)"
        ) from e
    except ValueError as e:
        raise TloraError(f"LoRA-DA cannot initialise {m.name}: {e}") from e


METHOD = Method(
    "lora-da",
    "LoRA-DA's Fisher-aware subspace, docs/lora-da.md",
    a_only(build_a),
    statistics=frozenset({COVARIANCES, *GRADIENT_STATISTICS}),
    center=False,  # LoRA-DA's K-FAC factor E[x x^T] is the uncentred second moment
    options=(DampingOptions, LoraDaOptions),
    lr=4e-3,
)
