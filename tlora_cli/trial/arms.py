"""The arms of a trial, (method, rate) pairs: which to run, and each one's short fine-tune and held-out score."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data import EncodedSample
from ..distributed import Dist
from ..progress import Reporter
from ..train.loop import Plan, Schedule, heldout_loss, train
from ..train.lora import Start, started
from .options import CLIP

EXTEND = 2  # rates added past an edge of a method's grid, at most, per side


@dataclass
class ArmResult:
    method: str
    lr: float
    heldout_loss: float
    train_loss: list[float]
    seconds: float


def first_rates(centre: float) -> list[float]:
    """A method's grid: half, once and twice its own rate."""
    return [centre / 2, centre, centre * 2]


def more_rates(tried: dict[float, float], centre: float) -> list[float]:
    """The next rate past an edge where the best sits on it, at most EXTEND past each side of the first grid."""
    best = min(tried, key=lambda lr: tried[lr])
    low, high = min(tried), max(tried)
    if best == high and sum(lr > centre * 2 for lr in tried) < EXTEND:
        return [high * 2]
    if best == low and sum(lr < centre / 2 for lr in tried) < EXTEND:
        return [low / 2]
    return []


@dataclass
class Runner:
    """Everything an arm needs but its start and rate: the model, the batches, the held-out samples."""

    model: torch.nn.Module
    batches: list[list[EncodedSample]]
    heldout: Sequence[EncodedSample]
    steps: int
    warmup: int
    plan: Plan
    reporter: Reporter

    def run(self, method: str, start: Start, lr: float) -> ArmResult:
        begin = time.perf_counter()
        schedule = Schedule(self.steps, lr, self.warmup, decay=True)
        label = f"{method} at {lr:g}"
        with started(self.model, start) as weights, self.reporter.phase(f"arm {label}", label, self.steps) as step:
            parameters = [t for w in weights.values() for t in w.trained()]
            losses = train(
                self.model, parameters, self.batches, schedule, self.plan, Dist(),
                lambda loss: step(description=f"{label} (loss {loss:.4f})"), clip=CLIP,
            )  # fmt: skip
            score = heldout_loss(self.model, self.heldout)
        return ArmResult(method, lr, score, losses, time.perf_counter() - begin)


def run_round(runner: Runner, arms: list[tuple[str, float]], starts: dict[str, Start], dist: Dist) -> list[ArmResult]:
    """Every arm of a round, shared out over the ranks (rank k runs arms k, k + K, ...); every rank gets them all."""
    mine = [
        runner.run(method, starts[method], lr)
        for i, (method, lr) in enumerate(arms)
        if i % dist.world_size == dist.rank
    ]
    gathered = dist.all_gather(mine)
    return sorted((r for part in gathered for r in part), key=lambda r: arms.index((r.method, r.lr)))
