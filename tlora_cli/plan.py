"""The allocation plan as a JSON file a person can read, edit and hand back to `tlora init --plan`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .allocation import ModuleAllocation
from .errors import TloraError
from .targets import Target

FORMAT = "tlora-plan/1"


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
    from .adapter import check_allocations_finite

    check_allocations_finite(allocations)
    try:
        text = json.dumps(plan_document(allocations, settings, fingerprint), indent=2, allow_nan=False)
    except ValueError as e:
        raise TloraError(f"the plan holds a number that is not finite ({e}): lower --alpha or recalibrate") from e
    path.write_text(text + "\n")


def _document(path: Path) -> dict:
    if not path.is_file():
        raise TloraError(f"plan {path} is not a file: pass the JSON file `tlora allocate` wrote")
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise TloraError(f"cannot read plan {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise TloraError(f"plan {path} is not valid JSON (line {e.lineno}): fix it or rerun `tlora allocate`") from e
    except (UnicodeDecodeError, RecursionError) as e:
        raise TloraError(f"plan {path} is not a readable JSON text: fix it or rerun `tlora allocate`") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("modules"), list):
        raise TloraError(f"{path} is not a tlora plan (format {FORMAT}): make one with `tlora allocate`")
    if not isinstance(doc.get("settings", {}), dict):
        raise TloraError(f'plan {path}: "settings" is not a JSON object; rerun `tlora allocate`')
    return doc


def check_plan_recipe(path: Path, recipe: str) -> None:
    """Before any work: the recipe decides more than ranks and alphas (whether A trains, what is recorded)."""
    made_with = _document(path).get("settings", {}).get("recipe", "default")
    if made_with != recipe:
        raise TloraError(f"plan {path} was made with --recipe {made_with}: pass --recipe {made_with} to init as well")


def read_plan(path: Path, targets: list[Target], fingerprint: str) -> tuple[list[ModuleAllocation], dict]:
    """Read a (possibly hand-edited) plan; only name, rank and alpha are taken from each module."""
    doc = _document(path)
    if doc.get("model_fingerprint") != fingerprint:
        raise TloraError(f"plan {path} was made for a different model than --model: rerun `tlora allocate`")
    entries = {m.get("name"): m for m in doc["modules"] if isinstance(m, dict)}
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
    return out, doc.get("settings", {})


def _finite_field(module: dict, field: str, path: Path, name: str) -> float:
    """A plan's score or share: absent (0) or a finite number; anything else would reach the metadata."""
    value = module.get(field, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TloraError(f"plan {path}: {name} has {field} {value!r}; it must be a finite number")
    return float(value)
