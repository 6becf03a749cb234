"""The settings of each stage, with their defaults in one place; each checks itself before anything is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .allocation import allocate, check_uniform_min_rank
from .errors import TloraError

RECIPES = ("default", "released")
RELEASED_NUM_SAMPLES = 256  # math_train.py's dataset.select(range(256))
DEFAULT_NUM_SAMPLES = 32
DEFAULT_BUDGET_RANK = 8


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise TloraError(f"--recipe must be one of {', '.join(RECIPES)}; got {recipe!r}")


@dataclass
class CalibrationOptions:
    """What calibration runs on and measures. None: the default (num_samples 32, 256 with the released
    recipe; center: SPEC.md's per-sample centred Cov[X], the uncentred second moment when gradients are
    collected for lora-da)."""

    num_samples: int | None = None
    seq_len: int = 512
    target_modules: str | None = None
    center: bool | None = None
    device: str | None = None
    dtype: str = "auto"
    seed: int = 0
    engine: str = "auto"
    batch_size: int | None = None  # None: the largest that fits (calib/sizing.py)
    offload_dir: Path | None = None
    read_ahead: bool = True  # stream engine: read the next layer while one computes
    gradients: bool = False  # also collect what --method lora-da needs
    covariances: bool = True  # False for methods that never read C (random, w-svd)
    recipe: str = "default"

    def check(self) -> None:
        """Fail on bad settings before any model is read."""
        check_recipe(self.recipe)
        if self.recipe == "released" and self.center is False:
            raise TloraError("--recipe released centres each sample, as the released code does: drop --no-center")
        if self.seq_len < 2:
            raise TloraError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.samples < 1:
            raise TloraError(f"--num-samples must be at least 1, got {self.samples}")
        if self.engine not in ("auto", "stream", "whole"):
            raise TloraError(f"--engine must be auto, stream or whole, got {self.engine!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise TloraError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.offload_dir is not None and not self.offload_dir.is_dir():
            raise TloraError(f"--offload-dir {self.offload_dir} is not an existing folder: create it first")

    @property
    def samples(self) -> int:
        if self.num_samples is not None:
            return self.num_samples
        return RELEASED_NUM_SAMPLES if self.recipe == "released" else DEFAULT_NUM_SAMPLES

    @property
    def centred(self) -> bool:
        return not self.gradients if self.center is None else self.center


@dataclass
class AllocationOptions:
    """How ranks and alphas are shared out. None: the default (budget_rank 8, alpha = budget_rank, min_rank 0);
    uniform: r_init and alpha everywhere, whatever rank_allocation and alpha_allocation say."""

    budget_rank: int | None = None
    alpha: float | None = None
    min_rank: int | None = None
    rank_allocation: bool = True
    alpha_allocation: bool = True
    recipe: str = "default"
    uniform: bool = False

    def check(self) -> None:
        """Fail on bad allocation flags before minutes of calibration."""
        check_recipe(self.recipe)
        if self.recipe == "released" and (self.min_rank or not (self.ranks_allocated and self.alphas_allocated)):
            raise TloraError(
                "--recipe released allocates ranks and alphas its own way: drop --min-rank, --uniform, "
                "--no-rank-allocation and --no-alpha-allocation"
            )
        allocate(["x"], [(self.rank, self.rank)], [1.0], self.rank, self.alpha, self.least_rank)
        check_uniform_min_rank(self.ranks_allocated, self.rank, self.least_rank)

    def check_with_plan(self) -> None:
        """A plan fixes every rank and alpha: the flags that would set them conflict with it."""
        if self.budget_rank is not None or self.alpha is not None or self.min_rank is not None or self.uniform:
            raise TloraError("--plan fixes every rank and alpha: drop --budget-rank/--alpha/--min-rank/--uniform")

    @property
    def rank(self) -> int:
        return DEFAULT_BUDGET_RANK if self.budget_rank is None else self.budget_rank

    @property
    def least_rank(self) -> int:
        return self.min_rank or 0

    @property
    def ranks_allocated(self) -> bool:
        return self.rank_allocation and not self.uniform

    @property
    def alphas_allocated(self) -> bool:
        return self.alpha_allocation and not self.uniform

    def settings(self, num_modules: int) -> dict:
        """What the plan and the metadata record: the options as applied, and the totals they give."""
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return {
            "budget_rank": self.rank,
            "alpha": alpha,
            "min_rank": self.least_rank,
            "rank_allocation": self.ranks_allocated,
            "alpha_allocation": self.alphas_allocated,
            "recipe": self.recipe,
            "budget": num_modules * self.rank,
            "alpha_total": num_modules * alpha,
        }
