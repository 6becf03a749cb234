"""Allocation is pure arithmetic: checked against hand-worked cases and SPEC.md's invariants."""

import random

import pytest

from tlora_cli.allocation import allocate, allocate_ranks, largest_remainder
from tlora_cli.errors import TloraError


def test_largest_remainder_sums_and_breaks_ties_to_the_first():
    assert largest_remainder([1.0, 2.0, 3.0, 4.0], 10) == [1, 2, 3, 4]
    assert largest_remainder([4 / 3, 4 / 3, 4 / 3], 4) == [2, 1, 1]
    assert largest_remainder([0.5, 0.5, 0.5, 0.5], 2) == [1, 1, 0, 0]
    assert largest_remainder([2.7, 0.2, 0.1], 3) == [3, 0, 0]
    assert largest_remainder([1.4, 1.6], 3) == [1, 2]


def test_proportional_without_clipping():
    assert allocate_ranks([1, 2, 3, 4], 10, [100] * 4) == [1, 2, 3, 4]
    assert allocate_ranks([1, 1, 1], 4, [100] * 3) == [2, 1, 1]


def test_clipping_at_the_module_size_respreads_the_excess():
    # 8 of 10 wanted by a module that holds only 4: the other 6 split evenly.
    assert allocate_ranks([8, 1, 1], 10, [4, 10, 10]) == [4, 3, 3]
    # Re-spreading can push a second module over its bound: clip again.
    assert allocate_ranks([6, 3, 1], 12, [3, 4, 20]) == [3, 4, 5]


def test_min_rank_takes_from_the_rest():
    assert allocate_ranks([10, 0, 0, 0], 8, [8] * 4, min_rank=1) == [5, 1, 1, 1]
    assert allocate_ranks([10, 0, 0, 0], 8, [8] * 4) == [8, 0, 0, 0]
    # A min rank larger than a module can hold stops at the module's size.
    assert allocate_ranks([1, 1], 6, [1, 10], min_rank=2) == [1, 5]


def test_infeasible_budgets_fail_clearly():
    with pytest.raises(TloraError, match="min-rank"):
        allocate_ranks([1, 1, 1], 5, [10] * 3, min_rank=2)
    with pytest.raises(TloraError, match="exceeds"):
        allocate_ranks([1, 1], 30, [10, 10])
    with pytest.raises(TloraError, match="at least 1"):
        allocate_ranks([1, 1], 0, [10, 10])
    with pytest.raises(TloraError, match="finite"):
        allocate_ranks([1, float("nan")], 4, [10, 10])


def test_all_zero_scores_share_equally():
    assert allocate_ranks([0, 0, 0], 6, [10] * 3) == [2, 2, 2]


def test_unscored_modules_take_what_full_scored_modules_cannot_hold():
    assert allocate_ranks([1, 0, 0], 7, [2, 10, 10]) == [2, 3, 2]


@pytest.mark.parametrize("seed", range(200))
def test_random_allocations_keep_the_invariants(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    scores = [rng.expovariate(1.0) ** 3 * rng.choice([0, 1, 1, 1]) for _ in range(n)]
    max_ranks = [rng.choice([4, 8, 16, 64, 512]) for _ in range(n)]
    min_rank = rng.choice([0, 0, 1, 2])
    budget = rng.randint(max(1, sum(min(min_rank, m) for m in max_ranks)), sum(max_ranks))
    ranks = allocate_ranks(scores, budget, max_ranks, min_rank)
    assert sum(ranks) == budget
    assert all(min(min_rank, m) <= r <= m for r, m in zip(ranks, max_ranks))
    # Independently: bisect for the water level of the continuous problem; each rank is its quota rounded.
    low = [min(min_rank, m) for m in max_ranks]
    if sum(m for m, s in zip(max_ranks, scores) if s > 0) + sum(lo for lo, s in zip(low, scores) if s == 0) < budget:
        return  # the scored modules are full; covered by test_unscored_modules_take_what...
    weights = scores if sum(scores) > 0 else [1.0] * n

    def total(level):
        return sum(min(max(level * w, lo), hi) for w, lo, hi in zip(weights, low, max_ranks))

    lo_level, hi_level = 0.0, 1.0
    while total(hi_level) < budget:
        hi_level *= 2
    for _ in range(200):
        mid = (lo_level + hi_level) / 2
        lo_level, hi_level = (mid, hi_level) if total(mid) < budget else (lo_level, mid)
    for r, w, lo, hi in zip(ranks, weights, low, max_ranks):
        assert abs(r - min(max(hi_level * w, lo), hi)) < 1 + 1e-6


def test_alpha_follows_spec_formula():
    names = ["a", "b", "c", "d"]
    shapes = [(64, 64)] * 4
    scores = [1.0, 2.0, 3.0, 4.0]
    plan = allocate(names, shapes, scores, rank=4, alpha=16)
    assert [p.rank for p in plan] == [2, 3, 5, 6]  # 16 * [.1,.2,.3,.4] = 1.6, 3.2, 4.8, 6.4
    for p, s in zip(plan, scores):
        share = s / 10
        assert p.share == pytest.approx(share)
        assert p.alpha == pytest.approx(p.rank * (4 * 16 / 4) * share)
        assert p.scaling == pytest.approx(4 * 16 * share / 4)


def test_equal_scores_give_plain_lora():
    plan = allocate(["a", "b", "c"], [(32, 16)] * 3, [5.0] * 3, rank=8, alpha=16)
    assert [(p.rank, p.alpha, p.scaling) for p in plan] == [(8, pytest.approx(16), pytest.approx(2))] * 3


def test_uniform_and_single_switches():
    names, shapes, scores = ["a", "b"], [(16, 16)] * 2, [1.0, 3.0]
    uniform = allocate(names, shapes, scores, rank=4, alpha=8, rank_allocation=False, alpha_allocation=False)
    assert [(p.rank, p.alpha) for p in uniform] == [(4, 8.0), (4, 8.0)]
    ranks_only = allocate(names, shapes, scores, rank=4, alpha=8, alpha_allocation=False)
    assert [(p.rank, p.alpha) for p in ranks_only] == [(2, 8.0), (6, 8.0)]
    alphas_only = allocate(names, shapes, scores, rank=4, alpha=8, rank_allocation=False)
    assert [p.rank for p in alphas_only] == [4, 4]
    assert [p.alpha for p in alphas_only] == pytest.approx([4 * 2 * 8 / 4 * 0.25, 4 * 2 * 8 / 4 * 0.75])


def test_rank_zero_modules_have_no_alpha_and_no_parameters():
    plan = allocate(["a", "b"], [(16, 8)] * 2, [1.0, 0.0], rank=2)
    assert [p.rank for p in plan] == [4, 0]
    assert plan[1].alpha == 0 and plan[1].scaling == 0 and plan[1].trainable_ab == 0
    assert plan[0].trainable_b == 16 * 4 and plan[0].trainable_ab == 24 * 4


def test_default_alpha_is_the_rank_and_bad_arguments_fail():
    assert allocate(["a"], [(8, 8)], [1.0], rank=4)[0].alpha == 4
    with pytest.raises(TloraError, match="--alpha"):
        allocate(["a"], [(8, 8)], [1.0], rank=4, alpha=0)
    with pytest.raises(TloraError, match="--budget-rank"):
        allocate(["a"], [(8, 8)], [1.0], rank=0)
    with pytest.raises(TloraError, match="--min-rank"):
        allocate(["a"], [(8, 8)], [1.0], rank=4, min_rank=-1)
    with pytest.raises(TloraError, match="exceeds the size"):
        allocate(["a"], [(8, 2)], [1.0], rank=4, rank_allocation=False)
