"""The commands as a library: `run_calibrate`, `run_allocate` and `run_init` take the options classes by keyword
and string the stages together (calibrate -> allocate -> factorise -> write); the CLI only builds the options.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from .adapter.metadata import metadata
from .adapter.sidecar import residual_record
from .adapter.writer import write_adapter, write_metadata
from .allocation import ModuleAllocation
from .calib.calibrate import WeightOf, calibrate, weights_from_checkpoint
from .calib.check import check_against_model
from .calib.folder import Calibration, load_calibration, save_calibration
from .calib.options import CalibrationOptions, MeasureOptions
from .calib.store import scratch_folder
from .data import DataOptions
from .distributed import Dist, launched
from .errors import TloraError
from .exports import serving_block
from .methods import InitSettings, MethodOptions
from .methods.base import ModuleInit, Preparation, Prepared
from .methods.factorise import factorise
from .model.checkpoint import checkpoint_dtype
from .model.loading import pick_device, pick_dtype
from .model.resolve import ModelOptions, ModelSource, base_model_name
from .options import Options, option
from .outputs.atomic import OutputOptions, atomic_dir, atomic_file
from .outputs.card import command_line, write_card
from .outputs.ownership import run_inputs
from .plan import AllocationOptions, check_plan_recipe, read_plan, write_plan
from .progress import Reporter
from .recipe import RecipeOptions

__all__ = [
    "AllocationOptions",
    "CalibrationOptions",
    "DataOptions",
    "ModelSource",
    "calibrate",
    "initialise",
    "run_allocate",
    "run_calibrate",
    "run_init",
]


def run_calibrate(
    *,
    output: OutputOptions,
    model: ModelOptions,
    data: DataOptions,
    calibration: CalibrationOptions,
    recipe: RecipeOptions,
    measure: MeasureOptions | None = None,
    reporter: Reporter,
) -> None:
    """`tlora calibrate`: the statistics and their provenance into a calibration directory."""
    measure = measure or MeasureOptions()
    check_all(model, data, calibration, recipe, measure)
    recipe.check_center(calibration.center)
    calibration = dataclasses.replace(
        calibration,
        num_samples=recipe.num_samples(calibration.num_samples),
        center=measure.default_center if calibration.center is None else calibration.center,
        statistics=measure.kinds,
    )
    out = output.out
    inputs = run_inputs(model.model, data.data, offload_dir=calibration.offload_dir)
    with (
        launched(pick_device(calibration.device)) as dist,
        _output(dist, output, "calibration", inputs) as tmp,
        scratch_folder(None if tmp else calibration.offload_dir, "tlora-statistics-") as scratch,  # ranks but 0
    ):
        calibration = dataclasses.replace(calibration, device=dist.device)
        source = ModelSource.open(model.model, model.revision)
        result, _ = calibrate(source, data, calibration, reporter, stats_dir=tmp or scratch, dist=dist)
        if tmp:
            save_calibration(result, tmp)
        dist.agree()  # no rank failed: rank 0 may put OUT in place
    reporter.info(f"wrote {out}: {len(result.stats.targets)} modules, {result.stats.num_tokens} tokens")


def run_allocate(
    *,
    calibration_dir: Path,
    output: OutputOptions,
    allocation: AllocationOptions,
    recipe: RecipeOptions,
    reporter: Reporter,
) -> None:
    """`tlora allocate`: ranks and alphas from a calibration directory's scores, as an editable plan."""
    check_all(allocation, recipe)
    allocation.check_recipe(recipe)
    calibration = load_calibration(calibration_dir)
    allocations = allocation.allocate(calibration.stats, recipe)
    inputs = run_inputs(calibration=calibration_dir, builtin_model=False)
    with atomic_file(output.out, output.overwrite, "plan", inputs) as tmp:
        settings = allocation.settings(len(allocations), recipe)
        write_plan(tmp, allocations, settings, calibration.model["fingerprint"])
    warning = calibration.stats.rank_warning(max(a.rank for a in allocations))
    if warning:
        reporter.warn(warning)
    active = sum(1 for a in allocations if a.rank)
    reporter.info(f"wrote {output.out}: {sum(a.rank for a in allocations)} ranks over {active} modules")


@dataclasses.dataclass
class ReuseOptions(Options):
    """What `init` may finish from instead of running the model (and allocating)."""

    calibration_dir: Path | None = option(
        None, "Reuse a `tlora calibrate` directory instead of running the model.", "--calibration"
    )
    plan: Path | None = option(None, "Use ranks and alphas from a `tlora allocate` plan.")


def run_init(
    *,
    output: OutputOptions,
    model: ModelOptions,
    data: DataOptions,
    calibration: CalibrationOptions,
    allocation: AllocationOptions,
    recipe: RecipeOptions,
    method: MethodOptions,
    method_options: dict[type, Options] | None = None,
    reuse: ReuseOptions | None = None,
    reporter: Reporter,
) -> None:
    """`tlora init`: calibrate (or read --calibration), allocate (or read --plan), factorise and write the adapter.

    The method's entry in METHODS says which statistics to measure and which covariance it reads. Every
    input is checked before any work; under torchrun every rank runs this and rank 0 alone writes OUT.
    """
    reuse = reuse or ReuseOptions()
    calibration_dir, plan = reuse.calibration_dir, reuse.plan
    init = InitSettings.of(method, method_options or {}, calibration.seed, recipe)
    explicit = calibration.center is not None
    calibration, allocation = _settle(model, data, calibration, allocation, recipe, init, reuse)
    side = init.method.side_adapter(init.options) if init.method.side_adapter else None
    inputs = run_inputs(model.model, data.data, calibration_dir, plan, calibration.offload_dir)
    with (
        launched(pick_device(calibration.device)) as dist,
        _output(dist, output, "adapter", inputs) as tmp,
        _output(
            dist, OutputOptions(side, output.overwrite), "adapter", (*inputs, ("-o", output.out)), bool(side)
        ) as side_tmp,
        scratch_folder(calibration.offload_dir, "tlora-statistics-") as stats_dir,
    ):
        calibration = dataclasses.replace(calibration, device=dist.device)
        if calibration_dir:
            source, result, weight_of = _finish_from(calibration_dir, model, init, calibration.centred, explicit)
            prepared = None
        else:
            source = ModelSource.open(model.model, model.revision)
            prepared, result, weight_of = _measure(
                source, data, calibration, allocation, init, reporter, dist, stats_dir
            )
        allocations, settings = _allocations(plan, allocation, recipe, result)
        write = Write(tmp, source, output.out.name, calibration.dtype, calibration.device)
        initialise(write, result, allocations, settings, weight_of, init, reporter, dist, prepared)
        if side_tmp is not None:
            side_write = dataclasses.replace(write, folder=side_tmp, name=side.name)
            write_side_adapter(side_write, result, allocations, settings, init, prepared, reporter)
    reporter.info(f"wrote {output.out}; see it with `tlora inspect {output.out}`")


def _settle(
    model: ModelOptions,
    data: DataOptions,
    calibration: CalibrationOptions,
    allocation: AllocationOptions,
    recipe: RecipeOptions,
    init: InitSettings,
    reuse: ReuseOptions,
) -> tuple[CalibrationOptions, AllocationOptions]:
    """Every flag checked; then what init measures with: the recipe's sample count, the method's covariance and
    statistics, and for a pre-launch r_init on every target."""
    if reuse.calibration_dir and data != DataOptions():
        raise TloraError("--calibration already holds the statistics of its data: drop --data and the data flags")
    check_all(model, data, calibration, allocation, recipe)
    _check_init_inputs(calibration, allocation, recipe, init, reuse)
    if init.method.prepare:
        allocation = dataclasses.replace(allocation, uniform=True)  # the phase trains r_init everywhere
    calibration = dataclasses.replace(
        calibration,
        num_samples=recipe.num_samples(calibration.num_samples),
        center=init.method.center if calibration.center is None else calibration.center,
        statistics=init.method.statistics,
    )
    return calibration, allocation


def _measure(
    source: ModelSource,
    data: DataOptions,
    calibration: CalibrationOptions,
    allocation: AllocationOptions,
    init: InitSettings,
    reporter: Reporter,
    dist: Dist,
    stats_dir: Path | None,
) -> tuple[Prepared | None, Calibration, WeightOf]:
    """The method's own phase before the factorisation (a pre-launch), or calibration."""
    if init.method.prepare is None:
        result, weight_of = calibrate(source, data, calibration, reporter, stats_dir, dist, spread=True)
        return None, result, weight_of
    preparation = Preparation(
        source, data, calibration, allocation.rank, allocation.alpha_value, init.options, reporter, dist
    )
    prepared = init.method.prepare(preparation)
    return prepared, prepared.calibration, prepared.weight_of


def _allocations(
    plan: Path | None, allocation: AllocationOptions, recipe: RecipeOptions, result: Calibration
) -> tuple[list[ModuleAllocation], dict]:
    """The plan's ranks and alphas, or the allocation of the calibration's scores, with the settings to record."""
    if plan:
        return read_plan(plan, result.stats.targets, result.model["fingerprint"])
    allocations = allocation.allocate(result.stats, recipe)
    return allocations, allocation.settings(len(allocations), recipe)


def check_all(*options: Options) -> None:
    """Every flag checked before any model, data or hub is read."""
    for group in options:
        group.check()


def _check_init_inputs(
    calibration: CalibrationOptions,
    allocation: AllocationOptions,
    recipe: RecipeOptions,
    init: InitSettings,
    reuse: ReuseOptions,
) -> None:
    """What `init` refuses before any work: flags that contradict the recipe, a plan or the method."""
    recipe.check_center(calibration.center)
    plan = reuse.plan
    if init.method.prepare:
        given = [
            flag
            for flag in (*reuse.given(), *allocation.given())
            if flag not in ("--budget-rank", "--alpha", "--uniform")
        ]
        if given:
            raise TloraError(
                f"--method {init.method.name} trains a LoRA of rank --budget-rank on every target first, and takes its "
                f"directions from it: it reads no calibration, plan or rank allocation; drop {given[0]}"
            )
    if plan:
        allocation.check_with_plan()
        check_plan_recipe(plan, recipe)
    else:
        allocation.check_recipe(recipe)
    if reuse.calibration_dir:
        _check_finishing_flags(calibration, init)


# What init --calibration reads from its own flags: the factorisation's device, the adapter's dtype and the
# covariance asked for (checked against the folder's); every other calibration flag only changes a calibration run.
FINISHING_FLAGS = ("--device", "--dtype", "--center", "--no-center")


def _check_finishing_flags(calibration: CalibrationOptions, init: InitSettings) -> None:
    """A flag that would silently change nothing: the folder already holds what it measured, and its modules."""
    ignored = [
        flag
        for flag in calibration.given()
        if flag not in FINISHING_FLAGS and not (flag == "--seed" and init.method.seeded)
    ]
    if ignored:
        raise TloraError(
            f"init --calibration finishes from statistics already measured: {', '.join(ignored)} would change "
            "nothing; drop it, or run `tlora calibrate` again with it"
        )


def _finish_from(
    calibration_dir: Path, model: ModelOptions, init: InitSettings, center: bool, explicit: bool
) -> tuple[ModelSource, Calibration, WeightOf]:
    """A calibration folder checked against itself, --model and the method: what init finishes from."""
    calibration = load_calibration(calibration_dir)
    source = ModelSource.open(model.model or calibration.model["name"], model.revision)
    calibration.check_model(source.checkpoint.fingerprint, str(calibration_dir))
    check_against_model(calibration, source.checkpoint, str(calibration_dir))
    init.check_calibration(calibration, center, explicit, str(calibration_dir))
    return source, calibration, weights_from_checkpoint(source.checkpoint)


@dataclasses.dataclass
class Write:
    """Where and how the adapter is written: `folder` None on ranks other than 0, which write nothing; `name`
    titles the model card (the folder's final name; it is written under a temporary one)."""

    folder: Path | None
    source: ModelSource
    name: str | None
    dtype: str = "auto"
    device: str | None = None

    def adapter_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return checkpoint_dtype(self.source.path)
        return pick_dtype(self.dtype, self.source.path, "cpu")


def initialise(
    write: Write,
    calibration: Calibration,
    allocations: list[ModuleAllocation],
    settings: dict,
    weight_of: WeightOf,
    init: InitSettings,
    reporter: Reporter,
    dist: Dist | None = None,
    prepared: Prepared | None = None,
) -> None:
    """Factorise and write the adapter (the caller makes its folder appear atomically). Under torchrun every rank
    factorises its share, rank 0 writes."""
    dist = dist or Dist()
    warning = calibration.stats.rank_warning(max(a.rank for a in allocations))
    if warning:
        reporter.warn(warning)
    device = pick_device(write.device)
    with reporter.phase("factorisation", f"Building A ({init.method.name})", len(allocations)) as step:
        state = prepared.state if prepared else None
        inits = factorise(allocations, calibration.stats, weight_of, device, init, step, dist, state)
    if write.folder is None:
        return  # a rank other than 0: its A matrices went to rank 0
    write_output(write, calibration, allocations, settings, init, inits, reporter)
    ranks = [a.rank for a in allocations if a.rank]
    trainable = sum(a.trainable_ab if init.trains_a else a.trainable_b for a in allocations)
    state = "trained" if init.trains_a else "frozen"
    reporter.info(
        f"{len(ranks)} of {len(allocations)} modules got an adapter, ranks {min(ranks)}-{max(ranks)} "
        f"(total {sum(ranks)}); {trainable:,} trainable parameters with A {state}"
    )


def write_output(
    write: Write,
    calibration: Calibration,
    allocations: list[ModuleAllocation],
    settings: dict,
    init: InitSettings,
    inits: dict[str, ModuleInit],
    reporter: Reporter,
    extra: dict | None = None,
) -> None:
    """The adapter folder: weights, config, sidecar, metadata (with `extra`'s fields) and card."""
    dtype = write.adapter_dtype()
    with reporter.phase("writing", "Writing the adapter"):
        base = base_model_name(write.source.name, write.source.path)
        write_adapter(write.folder, allocations, inits, dtype, base, init.method.residual)
    meta = metadata(calibration, allocations, settings, init, dtype, dict(reporter.timings))
    if init.method.residual:
        meta["residual"] = residual_record(write.folder)
    write_metadata(write.folder, {**meta, **(extra or {})})
    write_card(write.folder, command_line(), name=write.name, serving=serving_block())


def write_side_adapter(
    write: Write,
    calibration: Calibration,
    allocations: list[ModuleAllocation],
    settings: dict,
    init: InitSettings,
    prepared: Prepared,
    reporter: Reporter,
) -> None:
    """The method's second adapter (the pre-launch LoRA of --save-prelaunch): a plain PEFT adapter on the base."""
    dtype = write.adapter_dtype()
    base = base_model_name(write.source.name, write.source.path)
    write_adapter(write.folder, allocations, prepared.side_inits, dtype, base)
    meta = metadata(calibration, allocations, settings, init, dtype, dict(reporter.timings))
    meta.update(method=f"{init.method.name} pre-launch", train_a=True)
    write_metadata(write.folder, meta)
    write_card(write.folder, command_line(), name=write.name, serving=serving_block())


def _output(
    dist: Dist, output: OutputOptions, kind: str, inputs: tuple, wanted: bool = True
) -> contextlib.AbstractContextManager:
    """OUT's temp folder on rank 0, which alone writes (atomic_dir); None on the other ranks, or when not wanted."""
    if not dist.is_main or not wanted:
        return contextlib.nullcontext()
    return atomic_dir(output.out, output.overwrite, kind, inputs)
