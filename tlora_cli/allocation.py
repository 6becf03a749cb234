"""Rank and alpha allocation under a fixed budget (SPEC.md, "Allocation"). Pure functions, no torch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import TloraError


@dataclass(frozen=True)
class ModuleAllocation:
    """What one target module gets; `share` is its global p_i, kept for alpha and for reports."""

    name: str
    out_features: int
    in_features: int
    score: float
    share: float
    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    @property
    def trainable_b(self) -> int:
        """Parameters trained when A stays frozen (TLoRA's recipe)."""
        return self.out_features * self.rank

    @property
    def trainable_ab(self) -> int:
        return (self.out_features + self.in_features) * self.rank

    def as_dict(self) -> dict:
        """The plan's and the metadata's view of the module."""
        return {
            "name": self.name,
            "shape": [self.out_features, self.in_features],
            "score": self.score,
            "share": self.share,
            "rank": self.rank,
            "alpha": self.alpha,
            "scaling": self.scaling,
            "trainable_params_b": self.trainable_b,
            "trainable_params_ab": self.trainable_ab,
        }


def largest_remainder(quotas: Sequence[float], total: int) -> list[int]:
    """Round non-negative quotas to integers summing to `total`; ties go to the earlier index."""
    floors = [math.floor(q) for q in quotas]
    left = total - sum(floors)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - floors[i]), i))
    for i in order[:left]:
        floors[i] += 1
    return floors


def water_level(weights: Sequence[float], budget: int, low: Sequence[int], high: Sequence[int]) -> float:
    """The lambda with sum_i clip(lambda * w_i, low_i, high_i) == budget (the sum grows with lambda).

    Between two consecutive breakpoints (low_i / w_i, high_i / w_i) the sum is linear, so the
    crossing is found exactly: no bisection, no iteration that could oscillate.
    """

    def total(level: float) -> float:
        return sum(min(max(level * w, lo), hi) for w, lo, hi in zip(weights, low, high))

    points = sorted({b / w for w, lo, hi in zip(weights, low, high) if w > 0 for b in (lo, hi)})
    point = next(p for p in points if total(p) >= budget)  # exists: the caller checked the budget fits
    previous = max((p for p in points if p < point), default=0.0)
    free = [i for i, w in enumerate(weights) if w > 0 and low[i] <= previous * w and high[i] >= point * w]
    clipped = total(previous) - previous * sum(weights[i] for i in free)
    free_weight = sum(weights[i] for i in free)
    return (budget - clipped) / free_weight if free_weight else point


def allocate_ranks(scores: Sequence[float], budget: int, max_ranks: Sequence[int], min_rank: int = 0) -> list[int]:
    """Split `budget` in proportion to scores, clipped to [min_rank, max_i], rounded to sum exactly.

    Modules whose share falls outside their bounds keep the bound; what that frees or takes is
    re-spread over the others by the same proportional rule until nothing moves (the water level
    below), and the free modules' quotas are rounded by largest remainder.
    """
    n = len(scores)
    if budget < 1:
        raise TloraError(f"the rank budget must be at least 1, got {budget}")
    if any(s < 0 or not math.isfinite(s) for s in scores):
        raise TloraError("importance scores must be finite and non-negative; recompute the calibration")
    low = [min(min_rank, m) for m in max_ranks]
    if sum(low) > budget:
        raise TloraError(
            f"--min-rank {min_rank} on {n} modules needs {sum(low)} ranks, more than the budget {budget}: "
            "lower --min-rank or raise --budget-rank"
        )
    if sum(max_ranks) < budget:
        raise TloraError(
            f"the budget of {budget} ranks exceeds what the modules can hold ({sum(max_ranks)}): lower --budget-rank"
        )
    weights = _normalised(scores) if sum(scores) > 0 else [1.0] * n  # nothing to go by: share equally
    idle = [i for i in range(n) if weights[i] == 0]
    full = sum(max_ranks[i] for i in range(n) if weights[i] > 0) + sum(low[i] for i in idle)
    if full < budget:  # every scored module is full: the unscored ones share the rest equally
        ranks = [max_ranks[i] if weights[i] > 0 else 0 for i in range(n)]
        rest = allocate_ranks([1.0] * len(idle), budget - sum(ranks), [max_ranks[i] for i in idle], min_rank)
        for i, r in zip(idle, rest):
            ranks[i] = r
        return ranks
    level = water_level(weights, budget, low, max_ranks)
    ranks = [0] * n
    free = []
    for i, w in enumerate(weights):
        if level * w <= low[i]:
            ranks[i] = low[i]
        elif level * w >= max_ranks[i]:
            ranks[i] = max_ranks[i]
        else:
            free.append(i)
    room = budget - sum(ranks)
    free_weight = sum(weights[i] for i in free)
    for i, r in zip(free, largest_remainder([room * weights[i] / free_weight for i in free], room)):
        ranks[i] = r
    return ranks


def _normalised(scores: Sequence[float]) -> list[float]:
    """The scores times the power of two that brings the largest into [0.5, 1): exact, so every ratio, and so
    every rank, is what the scores give; but subnormal scores (a calibration scaled by 1e-310) no longer make the
    water level's breakpoints infinite, nor huge ones its sums, which broke the budget (768 ranks for 112)."""
    exponent = math.frexp(max(scores))[1]
    return [math.ldexp(score, -exponent) for score in scores]


def _checked_alpha(names: Sequence[str], rank: int, alpha: float | None) -> float:
    """The per-module alpha (default: the budget rank), after the checks both allocations share."""
    if not names:
        raise TloraError("no target modules to allocate")
    if rank < 1:
        raise TloraError(f"--budget-rank must be at least 1, got {rank}")
    alpha = float(rank) if alpha is None else float(alpha)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise TloraError(f"--alpha must be a positive number, got {alpha:g}")
    return alpha


def allocate(
    names: Sequence[str],
    shapes: Sequence[tuple[int, int]],
    scores: Sequence[float],
    rank: int,
    alpha: float | None = None,
    min_rank: int = 0,
    rank_allocation: bool = True,
    alpha_allocation: bool = True,
) -> list[ModuleAllocation]:
    """TLoRA's plan: budget L*rank, alpha_i = r_i * (L*alpha/rank) * p_i (SPEC.md).

    Switching off rank allocation gives every module `rank`; switching off alpha allocation gives
    every module `alpha` (plain LoRA scaling alpha/r_i). Both off is `--uniform`.
    """
    alpha = _checked_alpha(names, rank, alpha)
    if min_rank < 0:
        raise TloraError(f"--min-rank must be 0 or more, got {min_rank}")
    n = len(names)
    max_ranks = [min(o, i) for o, i in shapes]
    if rank_allocation:
        ranks = allocate_ranks(scores, n * rank, max_ranks, min_rank)
    else:
        too_big = [name for name, m in zip(names, max_ranks) if m < rank]
        if too_big:
            raise TloraError(
                f"--budget-rank {rank} exceeds the size of {too_big[0]} ({max_ranks[names.index(too_big[0])]}): "
                "lower --budget-rank"
            )
        ranks = [rank] * n
    weights = _normalised(scores)  # the same shares, and no sum of huge scores overflows
    total = sum(weights)
    shares = [w / total for w in weights] if total > 0 else [1.0 / n] * n
    out = []
    for name, (o, i), s, p, r in zip(names, shapes, scores, shares, ranks):
        a = r * (n * alpha / rank) * p if alpha_allocation else alpha
        out.append(ModuleAllocation(name, o, i, float(s), p, r, a if r else 0.0))
    return out


def allocate_released(
    names: Sequence[str],
    shapes: Sequence[tuple[int, int]],
    scores: Sequence[float],
    rank: int,
    alpha: float | None = None,
) -> list[ModuleAllocation]:
    """The released code's allocation (SPEC.md, "`--recipe released`"), for reproducing the paper's tables.

    r_i = round(R p_i) with Python's round (half to even); whatever that leaves over (or takes too
    much) goes one rank at a time to (or from) the module holding the largest rank, the first in model
    order on a tie. Its PEFT scaling is max(alpha, round(alpha_total p_i)) / r_init: the released layer
    divides by the config's r, not by r_i, so alpha_i = a_i * r_i / r_init here gives that scaling
    through PEFT's alpha_i / r_i. Rank-0 modules get no adapter (the released code would build one).
    """
    alpha = _checked_alpha(names, rank, alpha)
    if any(s < 0 or not math.isfinite(s) for s in scores):
        raise TloraError("importance scores must be finite and non-negative; recompute the calibration")
    n, total = len(names), sum(scores)
    if not total > 0:
        raise TloraError("every importance score is 0: the released recipe divides by their sum; recalibrate")
    shares = [s / total for s in scores]
    ranks = [round(n * rank * p) for p in shares]
    missing = n * rank - sum(ranks)
    while missing:
        largest = ranks.index(max(ranks))
        step = 1 if missing > 0 else -1
        ranks[largest] += step
        missing -= step
    out = []
    for name, (o, i), s, p, r in zip(names, shapes, scores, shares, ranks):
        if r > min(o, i):
            raise TloraError(
                f"the released recipe gives {name} rank {r}, more than its size {min(o, i)}: lower --budget-rank"
            )
        a = max(alpha, round(n * alpha * p))
        out.append(ModuleAllocation(name, o, i, float(s), p, r, a * r / rank if r else 0.0))
    return out


def check_allocations_finite(allocations: list[ModuleAllocation], where: str = "the allocation") -> None:
    """Every score, share, alpha and scaling a finite number, or one line naming the module and the flag."""
    for a in allocations:
        for field, value in (("score", a.score), ("share", a.share)):
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise TloraError(
                    f"{where} gives {a.name} the {field} {value!r}, which is not a finite number: "
                    "recalibrate (or fix the plan's scores)"
                )
        if a.rank and not (math.isfinite(a.alpha) and math.isfinite(a.scaling) and a.alpha > 0):
            raise TloraError(
                f"{where} gives {a.name} alpha {a.alpha!r} (scaling {a.scaling!r}), which is not a finite positive "
                "number: lower --alpha (or the plan's alpha)"
            )
