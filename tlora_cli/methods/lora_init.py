"""LoRA-Init (SPEC.md, "Task-specific directions"; papers/lora-tsd-paper.txt Eq. 7-9): after the pre-launch, A and B
on the r singular directions of W whose change rates were largest, W's own share of them taken out of the base.
A residual adapter: it trains and serves on W_res = W - s B A, never on W."""

from __future__ import annotations

from ..directions import INDICES, RATES, lora_init_factors
from .base import Method, ModuleInit, ModuleInputs
from .lora_dash import ranked
from .prelaunch import PrelaunchOptions, prelaunch, saved_prelaunch


def build(m: ModuleInputs) -> ModuleInit:
    chosen = ranked(m).first(m.rank)
    b, a = lora_init_factors(chosen, m.scaling)
    return ModuleInit(a.float(), b.float(), {INDICES: chosen.indices, RATES: chosen.rates})


METHOD = Method(
    "lora-init",
    "A and B on W's top-r task-specific directions after a pre-launch LoRA; a residual adapter",
    build,
    statistics=frozenset(),
    trains_a=True,
    options=(PrelaunchOptions,),
    prepare=prelaunch,
    residual=True,
    side_adapter=saved_prelaunch,
    lr=2.5e-4,
)
