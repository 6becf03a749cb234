"""`--recipe`: SPEC.md's default, or the paper's released code where it can be reproduced (SPEC.md,
"`--recipe released`"). One switch that touches calibration (256 samples), allocation (its rounding and
scaling) and training (A trained), so each stage asks it rather than reading a flag of its own."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import TloraError
from .options import Options, one_of, option

RECIPES = ("default", "released")
DEFAULT_NUM_SAMPLES = 32
RELEASED_NUM_SAMPLES = 256  # math_train.py's dataset.select(range(256))


@dataclass
class RecipeOptions(Options):
    recipe: str = option(
        "default",
        "default (SPEC.md), or released: the paper's released code (its rank rounding, alpha rule and 256 samples; "
        "A trained). See README 'Reproducing the paper'.",
        check=one_of(RECIPES),
    )

    @property
    def released(self) -> bool:
        return self.recipe == "released"

    def num_samples(self, asked: int | None) -> int:
        """N: as asked, else the recipe's."""
        if asked is not None:
            return asked
        return RELEASED_NUM_SAMPLES if self.released else DEFAULT_NUM_SAMPLES

    def check_center(self, center: bool | None) -> None:
        if self.released and center is False:
            raise TloraError("--recipe released centres each sample, as the released code does: drop --no-center")

    def check_method(self, method: str) -> None:
        if self.released and method != "tlora":
            raise TloraError(f"--recipe released reproduces TLoRA's released code: drop --method {method}")

    def check_allocation(self, custom: bool) -> None:
        """`custom`: a flag that changes how ranks or alphas are shared out was given."""
        if self.released and custom:
            raise TloraError(
                "--recipe released allocates ranks and alphas its own way: drop --min-rank, --uniform, "
                "--no-rank-allocation and --no-alpha-allocation"
            )
