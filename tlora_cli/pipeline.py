"""The stages as a library: calibrate -> allocate -> factorise -> write, and the commands that string them.

The CLI parses flags into options objects and calls run_calibrate, run_allocate or run_init with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from .adapter import write_adapter, write_metadata
from .allocation import ModuleAllocation, allocate, allocate_released
from .calib.collector import Collector
from .calib.folder import Calibration, load_calibration, save_calibration, statistic_stores
from .calib.sizing import Choice, ModelSize, batch_limit, choose, free_memory
from .calib.statistics import Statistics
from .calib.store import scratch_folder
from .calib.stream import stream_statistics
from .calib.streamed_model import StreamedModel
from .calib.whole import whole_statistics
from .calib_check import check_against_model
from .data import CalibrationSet, DataOptions, load_calibration_set, rank_warning
from .distributed import Dist, launched
from .errors import TloraError
from .metadata import covariance_kind, metadata
from .methods import METHODS, Covariances, InitOptions, ModuleInputs, check_gradients
from .model_card import base_model_name, command_line, write_card
from .model_io import (
    Checkpoint,
    checkpoint_dtype,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    read_config,
    resolve_model,
)
from .options import AllocationOptions, CalibrationOptions
from .output import atomic_dir, atomic_file
from .ownership import run_inputs
from .plan import check_plan_recipe, read_plan, write_plan
from .progress import Reporter
from .targets import find_targets, parse_suffixes

__all__ = [
    "AllocationOptions",
    "CalibrationOptions",
    "InitOptions",
    "ModelSource",
    "allocate_modules",
    "calibrate",
    "factorise",
    "initialise",
    "run_allocate",
    "run_calibrate",
    "run_init",
]

WeightOf = Callable[[str], torch.Tensor]


@dataclasses.dataclass
class ModelSource:
    """A resolved model: the name to record, the folder, and lazy access to its weights."""

    name: str
    path: Path
    checkpoint: Checkpoint

    @classmethod
    def open(cls, model: str | None, revision: str | None = None) -> ModelSource:
        path = resolve_model(model, revision)
        is_hub_id = model is not None and not Path(model).expanduser().is_dir()
        return cls(model if is_hub_id else str(path.resolve()), path, Checkpoint(path))


def calibrate(
    source: ModelSource,
    data: DataOptions | str | None,
    options: CalibrationOptions,
    reporter: Reporter,
    stats_dir: Path | None = None,
    dist: Dist | None = None,
    spread: bool = False,
) -> tuple[Calibration, WeightOf]:
    """Statistics per SPEC.md, on the whole model or streamed layer by layer (engine "auto": whichever fits).

    Statistics go to files under `stats_dir` as they are finished when one is given (a calibration
    directory being written, or scratch space in --offload-dir), else they stay in host memory.
    Under torchrun (`dist`) each rank runs its share of the samples; the sums of all go to rank 0, or with
    `spread` each input's to the rank that will factorise it (`stats.owners`); every rank gets the scores.
    Returns how to read each target's weight, for the factorisation that follows.
    """
    dist = dist or Dist()
    options.check()
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, source.path, device)
    suffixes = parse_suffixes(options.target_modules, read_config(source.path).get("model_type", ""))
    calib_set = _read_data(source, data, options, reporter)
    collector = Collector(options.centred, options.covariances, options.gradients, dtype, dist, spread)
    n = len(calib_set.samples)
    samples = [calib_set.samples[i] for i in dist.share(n)]  # all of them without torchrun
    choice = _choose_engine(source, options, len(samples), device, dtype, reporter, dist)
    with statistic_stores(stats_dir, options.gradients) as stores:
        if choice.engine == "whole":
            with reporter.phase("load", "Loading the whole model"):
                model = load_model(source.path, dtype, device)
            targets = find_targets(model, suffixes)
            with reporter.phase("forward_backward", "Calibrating (forward + backward)", len(samples)) as step:
                stats = whole_statistics(model, targets, samples, collector, stores, choice.batch_size, step)
            weight_of = weights_from_model(model)
        else:
            with reporter.phase("load", "Loading embeddings and head"):
                streamed = StreamedModel(source.path, source.checkpoint, dtype, device, options.read_ahead)
            targets = streamed.targets(suffixes)
            stats = stream_statistics(
                streamed, targets, samples, collector, stores, options.offload_dir, reporter, choice.batch_size
            )
            weight_of = weights_from_checkpoint(source.checkpoint)
    tokens = sum(len(s.input_ids) for s in calib_set.samples)
    owners = collector.owners if spread and dist.active else None
    stats = dataclasses.replace(stats, num_samples=n, num_tokens=tokens, owners=owners)  # all ranks' counts
    with reporter.phase("fingerprint", "Fingerprinting the model"):
        fingerprint = source.checkpoint.fingerprint
    settings = {
        "target_modules": list(suffixes),
        "center": options.centred,
        "engine": {"requested": options.engine, "used": choice.engine, "reason": choice.reason},
        "batch_size": choice.batch_size,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        **({"distributed": dist.record(n, owners)} if dist.active else {}),
    }
    model_info = {"name": source.name, "fingerprint": fingerprint}
    provenance = {**calib_set.provenance, **_data_record(calib_set, options)}
    return Calibration(stats, model_info, provenance, settings, dict(reporter.timings)), weight_of


def _choose_engine(
    source: ModelSource,
    options: CalibrationOptions,
    num_samples: int,
    device: str,
    dtype: torch.dtype,
    reporter: Reporter,
    dist: Dist,
) -> Choice:
    """The engine and batch size from free memory where not given (calib/sizing.py), said on stderr.

    Under torchrun every rank takes the same engine (the engines' collectives differ): streaming when any
    rank's memory calls for it, and the smallest batch size any rank picked.
    """
    size = ModelSize.of(read_config(source.path), source.checkpoint.num_elements())
    free = free_memory(device)
    choice = choose(
        size,
        options.engine,
        options.batch_size,
        num_samples,
        options.seq_len,
        dtype,
        options.gradients,
        free,
        batch_limit(device),
    )
    if dist.active:
        choices = dist.all_gather(choice)
        choice = next((c for c in choices if c.engine == "stream"), choice)
        choice = dataclasses.replace(choice, batch_size=min(c.batch_size for c in choices))
    reporter.info(f"engine: {choice.engine}, batch size {choice.batch_size} ({choice.reason})")
    return choice


def _read_data(
    source: ModelSource, data: DataOptions | str | None, options: CalibrationOptions, reporter: Reporter
) -> CalibrationSet:
    """The calibration samples, tokenised, with a line on what was read and what was left out."""
    with reporter.phase("data", "Reading calibration data"):
        tokenizer = load_tokenizer(source.path)
        calib_set = load_calibration_set(data, tokenizer, options.samples, options.seq_len, options.seed)
    reporter.info(
        f"{source.name}: {len(calib_set.samples)} samples from {calib_set.source}, {calib_set.num_tokens} tokens "
        f"({calib_set.num_loss_tokens} carry the loss)"
    )
    if calib_set.num_truncated:
        reporter.info(
            f"{calib_set.num_truncated} of {len(calib_set.samples)} samples were cut to {options.seq_len} tokens"
        )
    if calib_set.num_skipped:
        reporter.info(f"{calib_set.num_skipped} records with an empty text, prompt or response were passed over")
    if calib_set.num_available < options.samples:
        reporter.warn(
            f"{calib_set.source} has only {calib_set.num_available} samples; using all of them "
            f"instead of --num-samples {options.samples}"
        )
    return calib_set


def _data_record(calib_set: CalibrationSet, options: CalibrationOptions) -> dict:
    return {
        "source": calib_set.source,
        "num_skipped": calib_set.num_skipped,
        "sha256": calib_set.sha256,
        "num_samples": len(calib_set.samples),
        "num_available": calib_set.num_available,
        "num_tokens": calib_set.num_tokens,
        "num_loss_tokens": calib_set.num_loss_tokens,
        "seq_len": options.seq_len,
        "seed": options.seed,
    }


def allocate_modules(stats: Statistics, options: AllocationOptions) -> list[ModuleAllocation]:
    names, shapes = [t.name for t in stats.targets], [t.shape for t in stats.targets]
    scores = [stats.scores[t.name] for t in stats.targets]
    if options.recipe == "released":
        return allocate_released(names, shapes, scores, options.rank, options.alpha)
    return allocate(
        names,
        shapes,
        scores,
        rank=options.rank,
        alpha=options.alpha,
        min_rank=options.least_rank,
        rank_allocation=options.ranks_allocated,
        alpha_allocation=options.alphas_allocated,
    )


def weights_from_model(model: torch.nn.Module) -> WeightOf:
    modules = dict(model.named_modules())
    return lambda name: modules[name].weight.detach()


def weights_from_checkpoint(checkpoint: Checkpoint) -> WeightOf:
    def weight_of(name: str) -> torch.Tensor:
        key = f"{name}.weight"
        if key not in checkpoint.files:
            raise TloraError(f"the checkpoint has no tensor {key}: was the calibration made from this model?")
        weight = checkpoint.get(key)
        checkpoint.release()  # one module at a time: no reader keeps the pages already read resident
        return weight

    return weight_of


def factorise(
    allocations: list[ModuleAllocation],
    stats: Statistics,
    weight_of: WeightOf,
    device: str,
    options: InitOptions,
    on_module: Callable[[], None] | None = None,
    dist: Dist | None = None,
) -> dict[str, torch.Tensor]:
    """A_i for every module with r_i > 0, by the method's entry in METHODS; each covariance is read once.

    Under torchrun each rank builds those of the inputs it owns (where calibration left their statistics,
    else input_owners) and rank 0 gets them all; the other ranks get nothing back.
    """
    dist = dist or Dist()
    owners = stats.owners or input_owners(allocations, stats.input_of, dist)
    build_a = METHODS[options.method].build_a
    covariances = Covariances(stats, device)
    result: dict[str, torch.Tensor] = {}
    for a in allocations:
        if a.rank and owners[stats.input_of[a.name]] == dist.rank:
            inputs = ModuleInputs(a.name, a.rank, a.in_features, device, options, stats, weight_of, covariances)
            result[a.name] = build_a(inputs).cpu()
        if on_module:
            on_module()
    gathered = dist.gather_to_main(result)
    return {a.name: gathered[a.name] for a in allocations if a.name in gathered}


def factorisation_cost(a: ModuleAllocation) -> float:
    """Roughly the flops of A_i: the (out x in) W C product and an SVD or a subspace iteration of it."""
    return a.out_features * a.in_features * (a.in_features + a.rank) if a.rank else 0.0


def input_owners(allocations: list[ModuleAllocation], input_of: dict[str, str], dist: Dist) -> dict[str, int]:
    """The rank that builds A for the modules reading each input: all of them on one rank, which reads
    that input's covariance once; inputs shared out by cost."""
    costs: dict[str, float] = {}
    for a in allocations:
        key = input_of[a.name]
        costs[key] = costs.get(key, 0.0) + factorisation_cost(a)
    return dist.owner_of(costs)


def check_calibration(calibration: Calibration, init: InitOptions, center: bool, explicit: bool, where: str) -> None:
    """`init --calibration` finishes only from the statistics its method reads (SPEC.md): the gradient
    statistics for lora-da, and never the centred covariance for the uncentred moment or the reverse."""
    if init.spec.gradients:
        check_gradients(calibration.stats)
    if not init.spec.covariances:
        return
    held = bool(calibration.settings.get("center", False))
    if held == center:
        return
    flag, other = ("--center", "--no-center") if center else ("--no-center", "--center")
    fixed = explicit or init.recipe == "released"
    reader = "--recipe released" if init.recipe == "released" else f"--method {init.method}"
    asked = f"{flag} asks for" if explicit else f"{reader} reads"
    hint = f"recalibrate with `tlora calibrate {flag}`" + ("" if fixed else f", or pass {other} to use it as it is")
    raise TloraError(
        f"{where} holds the {covariance_kind(held)} of the layer inputs, and {asked} the "
        f"{covariance_kind(center)}: {hint}"
    )


def adapter_dtype(dtype: str, source: ModelSource) -> torch.dtype:
    return checkpoint_dtype(source.path) if dtype == "auto" else pick_dtype(dtype, source.path, "cpu")


def initialise(
    folder: Path | None,
    source: ModelSource,
    calibration: Calibration,
    allocations: list[ModuleAllocation],
    allocation: dict,
    weight_of: WeightOf,
    options: CalibrationOptions,
    init: InitOptions,
    reporter: Reporter,
    card_name: str | None = None,
    dist: Dist | None = None,
) -> None:
    """Factorise and write the adapter into `folder` (the caller makes it appear atomically); `card_name` titles
    its model card (the folder's final name). Under torchrun every rank factorises its share, rank 0 writes."""
    dist = dist or Dist()
    active = sum(1 for a in allocations if a.rank)
    largest = max(a.rank for a in allocations)
    warning = rank_warning(calibration.stats.num_tokens, largest)
    if warning:
        reporter.warn(warning)
    device = pick_device(options.device)
    with reporter.phase("factorisation", f"Building A ({init.method})", len(allocations)) as step:
        a_matrices = factorise(allocations, calibration.stats, weight_of, device, init, step, dist)
    if folder is None:
        return  # a rank other than 0: its A matrices went to rank 0
    dtype = adapter_dtype(options.dtype, source)
    with reporter.phase("writing", "Writing the adapter"):
        write_adapter(folder, allocations, a_matrices, dtype, base_model_name(source.name, source.path))
    write_metadata(folder, metadata(calibration, allocations, allocation, init, dtype, dict(reporter.timings)))
    write_card(folder, command_line(), name=card_name)
    ranks = [a.rank for a in allocations if a.rank]
    trainable = sum(a.trainable_ab if init.trains_a else a.trainable_b for a in allocations)
    reporter.info(
        f"{active} of {len(allocations)} modules got an adapter, ranks {min(ranks)}-{max(ranks)} "
        f"(total {sum(ranks)}); {trainable:,} trainable parameters with A {'trained' if init.trains_a else 'frozen'}"
    )


def run_calibrate(
    out: Path,
    model: str | None,
    revision: str | None,
    data: DataOptions,
    options: CalibrationOptions,
    overwrite: bool,
    reporter: Reporter,
) -> None:
    """`tlora calibrate`: the statistics and their provenance into a calibration directory."""
    data.check()
    options.check()
    inputs = run_inputs(model, data.data, offload_dir=options.offload_dir)
    with (
        launched(pick_device(options.device)) as dist,
        _output(dist, out, overwrite, "calibration", inputs) as tmp,
        scratch_folder(None if tmp else options.offload_dir, "tlora-statistics-") as scratch,  # ranks but 0
    ):
        options = dataclasses.replace(options, device=dist.device)
        source = ModelSource.open(model, revision)
        calibration, _ = calibrate(source, data, options, reporter, stats_dir=tmp or scratch, dist=dist)
        if tmp:
            save_calibration(calibration, tmp)
        dist.agree()  # no rank failed: rank 0 may put OUT in place
    reporter.info(f"wrote {out}: {len(calibration.stats.targets)} modules, {calibration.stats.num_tokens} tokens")


def run_allocate(
    calibration_dir: Path, out: Path, options: AllocationOptions, overwrite: bool, reporter: Reporter
) -> None:
    """`tlora allocate`: ranks and alphas from a calibration directory's scores, as an editable plan."""
    options.check()
    calibration = load_calibration(calibration_dir)
    allocations = allocate_modules(calibration.stats, options)
    with atomic_file(out, overwrite, "plan", run_inputs(calibration=calibration_dir, builtin_model=False)) as tmp:
        write_plan(tmp, allocations, options.settings(len(allocations)), calibration.model["fingerprint"])
    warning = rank_warning(calibration.stats.num_tokens, max(a.rank for a in allocations))
    if warning:
        reporter.warn(warning)
    reporter.info(
        f"wrote {out}: {sum(a.rank for a in allocations)} ranks over {sum(1 for a in allocations if a.rank)} modules"
    )


def run_init(
    out: Path,
    model: str | None,
    revision: str | None,
    data: DataOptions,
    calibration_dir: Path | None,
    plan: Path | None,
    allocation: AllocationOptions,
    init: InitOptions,
    calib: CalibrationOptions,
    overwrite: bool,
    reporter: Reporter,
) -> None:
    """`tlora init`: calibrate (or read --calibration), allocate (or read --plan), factorise and write the adapter.

    The method's entry in METHODS says which statistics to measure and which covariance it reads. Every
    input is checked before any work; under torchrun every rank runs this and rank 0 alone writes OUT.
    """
    if plan:
        allocation.check_with_plan()
        check_plan_recipe(plan, init.recipe)
    if calibration_dir and data != DataOptions():
        raise TloraError("--calibration already holds the statistics of its data: drop --data and the data flags")
    data.check()
    allocation.check()
    init.check()
    spec, explicit = init.spec, calib.center is not None
    center = calib.center if explicit else spec.center
    calib = dataclasses.replace(calib, center=center, gradients=spec.gradients, covariances=spec.covariances)
    calib.check()
    inputs = run_inputs(model, data.data, calibration_dir, plan, calib.offload_dir)
    with (
        launched(pick_device(calib.device)) as dist,
        _output(dist, out, overwrite, "adapter", inputs) as tmp,
        scratch_folder(calib.offload_dir, "tlora-statistics-") as stats_dir,
    ):
        calib = dataclasses.replace(calib, device=dist.device)
        if calibration_dir:
            calibration = load_calibration(calibration_dir)
            source = ModelSource.open(model or calibration.model["name"], revision)
            calibration.check_model(source.checkpoint.fingerprint, str(calibration_dir))
            check_against_model(calibration, source.checkpoint, str(calibration_dir))
            check_calibration(calibration, init, calib.centred, explicit, str(calibration_dir))
            weight_of = weights_from_checkpoint(source.checkpoint)
        else:
            source = ModelSource.open(model, revision)
            calibration, weight_of = calibrate(source, data, calib, reporter, stats_dir, dist, spread=True)
        if plan:
            allocations, settings = read_plan(plan, calibration.stats.targets, calibration.model["fingerprint"])
        else:
            allocations = allocate_modules(calibration.stats, allocation)
            settings = allocation.settings(len(allocations))
        initialise(tmp, source, calibration, allocations, settings, weight_of, calib, init, reporter, out.name, dist)
    reporter.info(f"wrote {out}; see it with `tlora inspect {out}`")


def _output(dist: Dist, out: Path, overwrite: bool, kind: str, inputs: tuple) -> contextlib.AbstractContextManager:
    """OUT's temp folder on rank 0, which alone writes (atomic_dir); None on the other ranks."""
    return atomic_dir(out, overwrite, kind, inputs) if dist.is_main else contextlib.nullcontext()
