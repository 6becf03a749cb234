"""The allocation plan: the options that shape it, the allocation they give, and the JSON file a person can read,
edit and hand back to `tlora init --plan`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .allocation import ModuleAllocation, allocate, allocate_released, check_allocations_finite
from .calib.statistics import Statistics
from .errors import TloraError
from .jsonio import read_object
from .model.targets import Target
from .options import Options, at_least, option, positive
from .recipe import RecipeOptions

FORMAT = "tlora-plan/1"
DEFAULT_BUDGET_RANK = 8


@dataclass
class AllocationOptions(Options):
    """How ranks and alphas are shared out. None: the default (budget_rank 8, alpha = budget_rank, min_rank 0);
    uniform: r_init and alpha everywhere, whatever rank_allocation and alpha_allocation say."""

    budget_rank: int | None = option(
        None, f"r_init: the budget is L * r_init ranks. Default {DEFAULT_BUDGET_RANK}.", check=at_least(1)
    )
    alpha: float | None = option(
        None, "LoRA alpha per module; alpha_total = L * alpha. Default: r_init.", check=positive
    )
    min_rank: int | None = option(
        None, "Smallest rank a module may get (0 lets a module go without adapter).", check=at_least(0)
    )
    uniform: bool = option(False, "Every module r_init and alpha (TLoRA init only, no allocation).", "--uniform")
    rank_allocation: bool = option(True, "Allocate ranks by importance (off: r_init everywhere).")
    alpha_allocation: bool = option(True, "Allocate alphas by importance (off: alpha everywhere).")

    def check_together(self) -> None:
        """Without rank allocation every module gets r_init: a --min-rank above it cannot hold, so say so."""
        if not self.ranks_allocated and self.least_rank > self.rank:
            raise TloraError(
                f"--min-rank {self.least_rank} is above --budget-rank {self.rank}, which every module gets without "
                "rank allocation (--uniform, --no-rank-allocation): lower --min-rank or raise --budget-rank"
            )

    def check_recipe(self, recipe: RecipeOptions) -> None:
        recipe.check_allocation(bool(self.min_rank) or not (self.ranks_allocated and self.alphas_allocated))

    def check_with_plan(self) -> None:
        """A plan fixes every rank and alpha: the flags that would set them conflict with it."""
        if self.budget_rank is not None or self.alpha is not None or self.min_rank is not None or self.uniform:
            raise TloraError("--plan fixes every rank and alpha: drop --budget-rank/--alpha/--min-rank/--uniform")

    @property
    def rank(self) -> int:
        return DEFAULT_BUDGET_RANK if self.budget_rank is None else self.budget_rank

    @property
    def alpha_value(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def least_rank(self) -> int:
        return self.min_rank or 0

    @property
    def ranks_allocated(self) -> bool:
        return self.rank_allocation and not self.uniform

    @property
    def alphas_allocated(self) -> bool:
        return self.alpha_allocation and not self.uniform

    def settings(self, num_modules: int, recipe: RecipeOptions) -> dict:
        """What the plan and the metadata record: the options as applied, and the totals they give."""
        alpha = self.alpha_value
        return {
            "budget_rank": self.rank,
            "alpha": alpha,
            "min_rank": self.least_rank,
            "rank_allocation": self.ranks_allocated,
            "alpha_allocation": self.alphas_allocated,
            "recipe": recipe.recipe,
            "budget": num_modules * self.rank,
            "alpha_total": num_modules * alpha,
        }

    def allocate(self, stats: Statistics, recipe: RecipeOptions) -> list[ModuleAllocation]:
        """The allocation of SPEC.md (or the released code's) over the calibration's scores."""
        names, shapes = [t.name for t in stats.targets], [t.shape for t in stats.targets]
        scores = [stats.scores[t.name] for t in stats.targets]
        if recipe.released:
            return allocate_released(names, shapes, scores, self.rank, self.alpha)
        return allocate(
            names,
            shapes,
            scores,
            rank=self.rank,
            alpha=self.alpha,
            min_rank=self.least_rank,
            rank_allocation=self.ranks_allocated,
            alpha_allocation=self.alphas_allocated,
        )


def plan_document(allocations: list[ModuleAllocation], settings: dict, fingerprint: str) -> dict:
    return {
        "format": FORMAT,
        "model_fingerprint": fingerprint,
        "settings": settings,
        "totals": {
            "rank": sum(a.rank for a in allocations),
            "modules_with_adapter": sum(1 for a in allocations if a.rank),
            "trainable_params_b": sum(a.trainable_b for a in allocations),
            "trainable_params_ab": sum(a.trainable_ab for a in allocations),
        },
        "modules": [a.as_dict() for a in allocations],
    }


def write_plan(path: Path, allocations: list[ModuleAllocation], settings: dict, fingerprint: str) -> None:
    check_allocations_finite(allocations)
    try:
        text = json.dumps(plan_document(allocations, settings, fingerprint), indent=2, allow_nan=False)
    except ValueError as e:
        raise TloraError(f"the plan holds a number that is not finite ({e}): lower --alpha or recalibrate") from e
    path.write_text(text + "\n")


def _document(path: Path) -> dict:
    if not path.is_file():
        raise TloraError(f"plan {path} is not a file: pass the JSON file `tlora allocate` wrote")
    doc = read_object(path, "fix it or rerun `tlora allocate`")
    if doc.get("format") != FORMAT or not isinstance(doc.get("modules"), list):
        raise TloraError(f"{path} is not a tlora plan (format {FORMAT}): make one with `tlora allocate`")
    if not isinstance(doc.get("settings", {}), dict):
        raise TloraError(f'plan {path}: "settings" is not a JSON object; rerun `tlora allocate`')
    return doc


def check_plan_recipe(path: Path, recipe: RecipeOptions) -> None:
    """Before any work: the recipe decides more than ranks and alphas (whether A trains, what is recorded)."""
    made_with = _document(path).get("settings", {}).get("recipe", "default")
    if made_with != recipe.recipe:
        raise TloraError(f"plan {path} was made with --recipe {made_with}: pass --recipe {made_with} to init as well")


def read_plan(path: Path, targets: list[Target], fingerprint: str) -> tuple[list[ModuleAllocation], dict]:
    """Read a (possibly hand-edited) plan; only name, rank and alpha are taken from each module."""
    doc = _document(path)
    if doc.get("model_fingerprint") != fingerprint:
        raise TloraError(f"plan {path} was made for a different model than --model: rerun `tlora allocate`")
    entries = _entries(doc, path)
    names = [t.name for t in targets]
    if set(entries) != set(names):
        odd = sorted(set(entries) ^ set(names))[0]
        raise TloraError(f"plan {path} and the calibration disagree on module {odd}: rerun `tlora allocate`")
    out = []
    for t in targets:
        m = entries[t.name]
        rank, alpha = m.get("rank"), m.get("alpha")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank <= min(t.shape):
            raise TloraError(f"plan {path}: {t.name} has rank {rank!r}; it must be an integer in [0, {min(t.shape)}]")
        if rank and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise TloraError(f"plan {path}: {t.name} has alpha {alpha!r}; it must be a positive number")
        score, share = _finite_field(m, "score", path, t.name), _finite_field(m, "share", path, t.name)
        out.append(ModuleAllocation(t.name, *t.shape, score, share, rank, float(alpha) if rank else 0.0))
    if not any(a.rank for a in out):
        raise TloraError(f"plan {path} gives every module rank 0: nothing to initialise")
    for a in out:
        _check_derived(entries[a.name], a, path)
    _check_totals(doc, out, path)
    return out, doc.get("settings", {})


def _entries(doc: dict, path: Path) -> dict[str, dict]:
    """The plan's module entries by name: each an object with a name, none listed twice (the last would win)."""
    entries: dict[str, dict] = {}
    for i, m in enumerate(doc["modules"], start=1):
        name = m.get("name") if isinstance(m, dict) else None
        if not isinstance(name, str):
            raise TloraError(f'plan {path}: module entry {i} is not an object with a "name"; rerun `tlora allocate`')
        if name in entries:
            raise TloraError(f"plan {path} lists module {name} twice: keep one entry, or rerun `tlora allocate`")
        entries[name] = m
    return entries


# Read from a plan: each module's name, rank and alpha (and score and share, for the record). The fields below
# follow from them; a hand edit must change them too or delete them, never leave them saying something else.
EDIT_ADVICE = "edit a module's rank and alpha only, and correct or delete what follows from them"


def _check_derived(entry: dict, a: ModuleAllocation, path: Path) -> None:
    """A module's shape, scaling and parameter counts, where the plan has them, must be its own."""
    derived = {
        "shape": [a.out_features, a.in_features],
        "scaling": a.scaling,
        "trainable_params_b": a.trainable_b,
        "trainable_params_ab": a.trainable_ab,
    }
    for field, value in derived.items():
        if field in entry and not _same(entry[field], value):
            raise TloraError(
                f"plan {path}: {a.name} has {field} {entry[field]!r}, but its rank and alpha (and the model) give "
                f"{value!r}: {EDIT_ADVICE}"
            )


def _check_totals(doc: dict, allocations: list[ModuleAllocation], path: Path) -> None:
    """The plan's totals, and the budget and alpha_total of its settings, against its own modules."""
    n, settings = len(allocations), doc.get("settings", {})
    expected = {
        ("totals", "rank"): sum(a.rank for a in allocations),
        ("totals", "modules_with_adapter"): sum(1 for a in allocations if a.rank),
        ("totals", "trainable_params_b"): sum(a.trainable_b for a in allocations),
        ("totals", "trainable_params_ab"): sum(a.trainable_ab for a in allocations),
    }
    for key, factor in (("budget", "budget_rank"), ("alpha_total", "alpha")):
        if _number(settings.get(factor)):
            expected["settings", key] = n * settings[factor]
    totals = doc.get("totals", {})
    if not isinstance(totals, dict):
        raise TloraError(f'plan {path}: "totals" is not a JSON object; {EDIT_ADVICE}')
    for (part, key), value in expected.items():
        given = (totals if part == "totals" else settings).get(key, value)
        if not _same(given, value):
            raise TloraError(
                f'plan {path}: {part} "{key}" is {given!r}, but its {n} modules give {value!r}: {EDIT_ADVICE}'
            )


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _same(given: object, value: object) -> bool:
    """Equal, numbers to a relative 1e-6 (a hand-written scaling may be rounded)."""
    if _number(given) and _number(value):
        return math.isclose(given, value, rel_tol=1e-6, abs_tol=1e-12)
    return given == value


def _finite_field(module: dict, field: str, path: Path, name: str) -> float:
    """A plan's score or share: absent (0) or a finite number; anything else would reach the metadata."""
    value = module.get(field, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TloraError(f"plan {path}: {name} has {field} {value!r}; it must be a finite number")
    return float(value)
