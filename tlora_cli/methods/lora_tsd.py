"""LoRA-TSD (SPEC.md, "Task-specific directions"; papers/lora-tsd-paper.txt Eq. 10): LoRA-Init's residual start and
LoRA-Dash's trainable coefficients on the top s_d of the same ranking, W_res + s B A + sum_j dsigma_j u_j v_j^T."""

from __future__ import annotations

from ..directions import INDICES, RATES, lora_init_factors
from .base import Method, ModuleInit, ModuleInputs
from .lora_dash import DashOptions, dash_directions, ranked
from .prelaunch import PrelaunchOptions, prelaunch, saved_prelaunch


def build(m: ModuleInputs) -> ModuleInit:
    directions = ranked(m)
    chosen = directions.first(m.rank)
    b, a = lora_init_factors(chosen, m.scaling)
    sidecar = {INDICES: chosen.indices, RATES: chosen.rates, **dash_directions(m, directions)}
    return ModuleInit(a.float(), b.float(), sidecar)


METHOD = Method(
    "lora-tsd",
    "LoRA-Init's residual start plus LoRA-Dash's trainable coefficients",
    build,
    statistics=frozenset(),
    trains_a=True,
    options=(PrelaunchOptions, DashOptions),
    prepare=prelaunch,
    residual=True,
    side_adapter=saved_prelaunch,
    lr=2.5e-4,
)
