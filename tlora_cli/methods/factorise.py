"""Every module's A by its method, each covariance read once; under torchrun shared out over the ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..allocation import ModuleAllocation
from ..calib.statistics import Statistics
from ..distributed import Dist
from . import InitSettings
from .base import Covariances, ModuleInit, ModuleInputs


def factorise(
    allocations: list[ModuleAllocation],
    stats: Statistics,
    weight_of: Callable[[str], torch.Tensor],
    device: str,
    init: InitSettings,
    on_module: Callable[[], None] | None = None,
    dist: Dist | None = None,
    state: dict[str, Any] | None = None,
) -> dict[str, ModuleInit]:
    """Every module's start (r_i > 0) by the method's entry in METHODS; each covariance is read once. `state`: what
    the method's prepare phase left, per module.

    Under torchrun each rank builds those of the inputs it owns (where calibration left their statistics,
    else input_owners) and rank 0 gets them all; the other ranks get nothing back.
    """
    dist = dist or Dist()
    owners = stats.owners or input_owners(allocations, stats.input_of, dist)
    covariances = Covariances(stats, device)
    options = {c: init.options[c] for c in init.method.options}
    state = state or {}
    result: dict[str, ModuleInit] = {}
    for a in allocations:
        if a.rank and owners[stats.input_of[a.name]] == dist.rank:
            inputs = ModuleInputs(
                a.name,
                a.rank,
                a.alpha,
                a.in_features,
                device,
                options,
                init.seed,
                stats,
                weight_of,
                covariances,
                state.get(a.name),
            )
            start = init.method.build(inputs)
            result[a.name] = ModuleInit(
                start.a.cpu(),
                None if start.b is None else start.b.cpu(),
                {k: v.cpu() for k, v in start.sidecar.items()},
            )
        if on_module:
            on_module()
    gathered = dist.gather_to_main(result)
    return {a.name: gathered[a.name] for a in allocations if a.name in gathered}


def factorisation_cost(a: ModuleAllocation) -> float:
    """Roughly the flops of A_i: the (out x in) W C product and an SVD or a subspace iteration of it."""
    return a.out_features * a.in_features * (a.in_features + a.rank) if a.rank else 0.0


def input_owners(allocations: list[ModuleAllocation], input_of: dict[str, str], dist: Dist) -> dict[str, int]:
    """The rank that builds A for the modules reading each input: all of them on one rank, which reads
    that input's covariance once; inputs shared out by cost."""
    costs: dict[str, float] = {}
    for a in allocations:
        key = input_of[a.name]
        costs[key] = costs.get(key, 0.0) + factorisation_cost(a)
    return dist.owner_of(costs)
