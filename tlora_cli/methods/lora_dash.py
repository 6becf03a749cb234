"""LoRA-Dash (SPEC.md, "Task-specific directions"; papers/lora-tsd-paper.txt Eq. 5): the pre-launch LoRA goes on as
it is, and each module gains a trainable coefficient dsigma_j on each of W's s_d most-changed directions,
W + s B A + sum_j dsigma_j u_j v_j^T, dsigma starting at 0. PEFT's format has no place for the term: it lives in the
adapter's sidecar, `load_for_training` attaches it, `tlora export --format lora` folds it into a plain LoRA."""

from __future__ import annotations

from dataclasses import dataclass

from ..directions import Directions, dash_fields, ranked_directions
from ..errors import TloraError
from ..options import Options, at_least, option
from .base import Method, ModuleInit, ModuleInputs
from .prelaunch import PrelaunchOptions, prelaunch, saved_prelaunch


@dataclass
class DashOptions(Options):
    dash_directions: int | None = option(
        None,
        "lora-dash, lora-tsd: s_d, the directions with a trainable coefficient each. Default 8.",
        check=at_least(1),
        fallback=8,
    )


def ranked(m: ModuleInputs) -> Directions:
    """W's directions, most changed by the pre-launch first."""
    weight = m.weight()
    lora = m.state
    return ranked_directions(weight, lora.a.to(weight.device), lora.b.to(weight.device), lora.scaling)


def dash_directions(m: ModuleInputs, directions: Directions) -> dict:
    count = m.option(DashOptions, "dash_directions")
    if count > len(directions.s):
        raise TloraError(f"--dash-directions {count} is more than {m.name} has ({len(directions.s)}): lower it")
    return dash_fields(directions.first(count))


def build(m: ModuleInputs) -> ModuleInit:
    """A and B where the pre-launch left them (the paper's run does not restart), the Dash term beside them."""
    return ModuleInit(m.state.a, m.state.b, dash_directions(m, ranked(m)))


METHOD = Method(
    "lora-dash",
    "the pre-launch LoRA plus a trainable coefficient on each of W's top task-specific directions",
    build,
    statistics=frozenset(),
    trains_a=True,
    options=(PrelaunchOptions, DashOptions),
    prepare=prelaunch,
    changes_model=True,
    side_adapter=saved_prelaunch,
    lr=2.5e-4,
)
