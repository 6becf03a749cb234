"""Every chosen method's start, from one loaded model: one calibration per covariance the methods read (none when
none reads one), one pre-launch shared by the methods that need it, then each method's factorisation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..allocation import ModuleAllocation
from ..calib.calibrate import calibrate, weights_from_model
from ..calib.folder import Calibration
from ..calib.options import CalibrationOptions
from ..data import CalibrationSet, DataOptions
from ..directions import DASH_SIGMA, DASH_U, DASH_VH
from ..distributed import Dist
from ..methods import METHODS, InitSettings, MethodOptions
from ..methods.base import ModuleInit, Preparation, Prepared
from ..methods.factorise import factorise
from ..model.resolve import ModelSource
from ..options import Options
from ..plan import AllocationOptions
from ..progress import Reporter
from ..recipe import RecipeOptions
from ..train.lora import LoraWeights, Start
from .split import Split


@dataclass
class MethodStart:
    """One method's start, and what writing it as an adapter needs (the winner's is written to TRIAL/best)."""

    init: InitSettings
    calibration: Calibration
    allocations: list[ModuleAllocation]
    settings: dict
    inits: dict[str, ModuleInit]
    start: Start


@dataclass
class Inputs:
    """What every method's start is built from."""

    source: ModelSource
    model: torch.nn.Module
    split: Split
    calibration: CalibrationOptions
    allocation: AllocationOptions
    options: dict[type, Options]
    reporter: Reporter


def build_starts(names: list[str], inputs: Inputs) -> dict[str, MethodStart]:
    """Methods that read statistics allocate ranks by the calibration's scores; the others (random, w-svd, the
    pre-launch family) give every module r_init and alpha, as they are used without tlora's allocation."""
    recipe = RecipeOptions()
    calibrations: dict[bool, tuple[Calibration, object]] = {}
    prepared: dict[object, Prepared] = {}
    starts = {}
    for name in names:
        method = METHODS[name]
        own = {c: inputs.options[c] for c in method.options}  # the flags another chosen method reads are not its
        init = InitSettings.of(MethodOptions(method=name), own, inputs.calibration.seed, recipe)
        allocation, state = inputs.allocation, None
        if method.prepare is not None:
            if method.prepare not in prepared:
                prepared[method.prepare] = method.prepare(_preparation(inputs))
            made = prepared[method.prepare]
            calibration, weight_of, state = made.calibration, made.weight_of, made.state
        elif method.statistics:
            if method.center not in calibrations:
                calibrations[method.center] = _calibrate(inputs, method.center, names)
            calibration, weight_of = calibrations[method.center]
        else:
            calibration, weight_of = _uncalibrated(inputs, calibrations, prepared), weights_from_model(inputs.model)
        if not method.statistics:
            allocation = dataclasses.replace(allocation, uniform=True)
        allocations = allocation.allocate(calibration.stats, recipe)
        device = str(next(inputs.model.parameters()).device)
        with inputs.reporter.phase(f"factorisation_{name}", f"Building {name}", len(allocations)) as step:
            inits = factorise(allocations, calibration.stats, weight_of, device, init, step, Dist(), state)
        settings = allocation.settings(len(allocations), recipe)
        starts[name] = MethodStart(init, calibration, allocations, settings, inits, to_start(allocations, inits, init))
    return starts


def to_start(allocations: list[ModuleAllocation], inits: dict[str, ModuleInit], init: InitSettings) -> Start:
    weights, residual = {}, {}
    for a in allocations:
        if not a.rank:
            continue
        start = inits[a.name]
        b = torch.zeros(a.out_features, a.rank) if start.b is None else start.b
        dash = [start.sidecar.get(f) for f in (DASH_U, DASH_VH, DASH_SIGMA)]
        weights[a.name] = LoraWeights(start.a.float(), b.float(), a.scaling, *dash)
        if init.method.residual:
            residual[a.name] = (start.a.float(), b.float(), a.scaling)
    return Start(weights, residual, init.trains_a)


def _preparation(inputs: Inputs) -> Preparation:
    return Preparation(
        inputs.source,
        DataOptions(),
        inputs.calibration,
        inputs.allocation.rank,
        inputs.allocation.alpha_value,
        inputs.options,
        inputs.reporter,
        Dist(),
        samples=inputs.split.pool,
        model=inputs.model,
    )


def _calibrate(inputs: Inputs, center: bool, names: list[str]) -> tuple[Calibration, object]:
    """One calibration on the pool's first N samples, measuring every statistic the methods of this centring read."""
    kinds = frozenset().union(*(METHODS[n].statistics for n in names if METHODS[n].center == center))
    options = dataclasses.replace(inputs.calibration, center=center, statistics=kinds)
    pool = inputs.split.pool
    samples: CalibrationSet = dataclasses.replace(
        pool, samples=pool.samples[: options.samples], wheres=pool.wheres[: options.samples]
    )
    return calibrate(inputs.source, samples, options, inputs.reporter, loaded=inputs.model)


def _uncalibrated(inputs: Inputs, calibrations: dict, prepared: dict) -> Calibration:
    """The targets of a method that reads no statistics, from a calibration or pre-launch already made, or an empty
    calibration (only the scores, which a uniform allocation does not read)."""
    for made in (*(c for c, _ in calibrations.values()), *(p.calibration for p in prepared.values())):
        return made
    options = dataclasses.replace(inputs.calibration, statistics=frozenset())
    pool = inputs.split.pool
    samples = dataclasses.replace(pool, samples=pool.samples[:1], wheres=pool.wheres[:1])
    calibrations[None] = calibrate(inputs.source, samples, options, inputs.reporter, loaded=inputs.model)
    return calibrations[None][0]
