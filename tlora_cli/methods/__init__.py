"""The init methods, by name. A new method is one module here (its Method and option classes) and one line in
METHODS; the CLI lists the methods and their flags from this table, calibration measures what the chosen one
reads, and `init --calibration` checks the folder against it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..calib.folder import Calibration
from ..calib.statistics import COVARIANCES, KINDS
from ..errors import TloraError
from ..options import Options, one_of, option
from ..recipe import RecipeOptions
from . import lora_da, lora_dash, lora_init, lora_tsd, random_init, theory, tlora, w_svd
from .base import Method

METHODS: Mapping[str, Method] = {
    m.name: m
    for m in (
        tlora.METHOD,
        w_svd.METHOD,
        random_init.METHOD,
        theory.METHOD,
        lora_da.METHOD,
        lora_init.METHOD,
        lora_dash.METHOD,
        lora_tsd.METHOD,
    )
}
# Every option class some method reads, each once, in the table's order: the flags `tlora init` shows.
OPTION_CLASSES: tuple[type[Options], ...] = tuple(dict.fromkeys(c for m in METHODS.values() for c in m.options))


def methods_help() -> str:
    return ", ".join(f"{m.name} ({m.summary})" for m in METHODS.values()) + "."


@dataclass
class MethodOptions(Options):
    method: str = option("tlora", methods_help(), check=one_of(METHODS))
    train_a: bool | None = option(
        None, "Recorded for the training helper. Default: frozen, trained for random.", "--train-a/--freeze-a"
    )


@dataclass
class InitSettings:
    """How A is built: the method, its options (every option class, by class), the run's seed and recipe."""

    method: Method
    options: dict[type, Options]
    seed: int
    recipe: RecipeOptions
    train_a: bool | None = None

    @classmethod
    def of(cls, chosen: MethodOptions, options: dict[type, Options], seed: int, recipe: RecipeOptions) -> InitSettings:
        """Checked: the method exists, the recipe allows it, and no flag is given that it does not read."""
        chosen.check()
        recipe.check_method(chosen.method)
        method = METHODS[chosen.method]
        options = {c: options.get(c) or c() for c in OPTION_CLASSES}
        for option_class, value in options.items():
            value.check()
            given = value.given()
            if given and option_class not in method.options:
                readers = [m.name for m in METHODS.values() if option_class in m.options]
                raise TloraError(
                    f"{given[0]} is read by --method {' and '.join(readers)}, not by --method {method.name}: drop it"
                )
        return cls(method, options, seed, recipe, chosen.train_a)

    @property
    def trains_a(self) -> bool:
        """The released code trains A with B (get_peft_model makes every lora_ weight trainable)."""
        if self.train_a is not None:
            return self.train_a
        return self.method.trains_a or self.recipe.released

    def recorded(self) -> dict:
        """The options the method reads, for the metadata."""
        return {k: v for c in self.method.options for k, v in self.options[c].values().items()}

    def check_calibration(self, calibration: Calibration, center: bool, explicit: bool, where: str) -> None:
        """`init --calibration` finishes only from the statistics its method reads (SPEC.md): every kind it
        needs, and never the centred covariance for the uncentred moment or the reverse."""
        method = self.method
        missing = sorted(method.statistics - calibration.stats.kinds)
        if missing:
            command = (
                "tlora calibrate --gradients" if all(KINDS[k].from_gradient for k in missing) else "tlora calibrate"
            )
            raise TloraError(
                f"--method {method.name} needs the statistics {', '.join(missing)}, which {where} lacks: calibrate "
                f"with `{command}`, or run `tlora init --method {method.name}` without --calibration"
            )
        if COVARIANCES not in method.statistics:
            return
        held = bool(calibration.settings.get("center", False))
        if held != center:
            raise TloraError(_center_mismatch(held, center, explicit, self, where))


def covariance_kind(center: bool) -> str:
    return "covariance centred per sample" if center else "uncentred second moment"


def _center_mismatch(held: bool, center: bool, explicit: bool, init: InitSettings, where: str) -> str:
    flag, other = ("--center", "--no-center") if center else ("--no-center", "--center")
    fixed = explicit or init.recipe.released
    reader = "--recipe released" if init.recipe.released else f"--method {init.method.name}"
    asked = f"{flag} asks for" if explicit else f"{reader} reads"
    hint = f"recalibrate with `tlora calibrate {flag}`" + ("" if fixed else f", or pass {other} to use it as it is")
    return (
        f"{where} holds the {covariance_kind(held)} of the layer inputs, and {asked} the "
        f"{covariance_kind(center)}: {hint}"
    )
