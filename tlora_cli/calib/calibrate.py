"""Calibration as one call: the data read, the engine picked, the model run under the collector, the provenance
recorded (SPEC.md, "Statistics")."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from ..data import CalibrationSet, DataOptions, load_calibration_set
from ..distributed import Dist
from ..errors import TloraError
from ..model.checkpoint import Checkpoint, read_config
from ..model.loading import load_model, load_tokenizer, pick_device, pick_dtype
from ..model.resolve import ModelSource
from ..model.targets import find_targets, parse_suffixes
from ..progress import Reporter
from .collector import Collector
from .folder import Calibration, statistic_stores
from .options import CalibrationOptions
from .sizing import Choice, ModelSize, batch_limit, choose, free_memory
from .statistics import Statistics, StatisticStores
from .stream import stream_statistics
from .streamed_model import StreamedModel
from .whole import whole_statistics

WeightOf = Callable[[str], torch.Tensor]


def calibrate(
    source: ModelSource,
    data: DataOptions | str | CalibrationSet | None,
    options: CalibrationOptions,
    reporter: Reporter,
    stats_dir: Path | None = None,
    dist: Dist | None = None,
    spread: bool = False,
    loaded: torch.nn.Module | None = None,
) -> tuple[Calibration, WeightOf]:
    """Statistics per SPEC.md, on the whole model or streamed layer by layer (engine "auto": whichever fits).

    Statistics go to files under `stats_dir` as they are finished when one is given (a calibration
    directory being written, or scratch space in --offload-dir), else they stay in host memory.
    Under torchrun (`dist`) each rank runs its share of the samples; the sums of all go to rank 0, or with
    `spread` each input's to the rank that will factorise it (`stats.owners`); every rank gets the scores.
    Returns how to read each target's weight, for the factorisation that follows. `data` may be samples already
    read (a CalibrationSet); `loaded`, the whole model already in memory, which the whole engine then runs.
    """
    dist = dist or Dist()
    options.check()
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, source.path, device)
    calib_set = data if isinstance(data, CalibrationSet) else read_data(source, data, options, reporter)
    collector = Collector(options.centred, options.statistics, dtype, dist, spread)
    n = len(calib_set.samples)
    samples = [calib_set.samples[i] for i in dist.share(n)]  # all of them without torchrun
    if loaded is None:
        choice = choose_engine(source, options, len(samples), device, dtype, reporter, dist)
    else:
        choice = Choice("whole", options.batch_size or 1, "the whole model is loaded already")
    suffixes = parse_suffixes(options.target_modules, read_config(source.path).get("model_type", ""))
    with statistic_stores(stats_dir, options.statistics) as stores:
        run = (source, choice, suffixes, samples, collector, stores, options, reporter, dtype, device, loaded)
        stats, weight_of = _run(*run)
    owners = collector.owners if spread and dist.active else None
    tokens = sum(len(s.input_ids) for s in calib_set.samples)
    stats = dataclasses.replace(stats, num_samples=n, num_tokens=tokens, owners=owners)  # all ranks' counts
    with reporter.phase("fingerprint", "Fingerprinting the model"):
        fingerprint = source.checkpoint.fingerprint
    settings = _settings(options, choice, suffixes, device, dtype)
    if dist.active:
        settings["distributed"] = dist.record(n, owners)
    model_info = {"name": source.name, "fingerprint": fingerprint, **source.provenance()}
    provenance = {**calib_set.provenance, **data_record(calib_set, options)}
    return Calibration(stats, model_info, provenance, settings, dict(reporter.timings)), weight_of


def _settings(options: CalibrationOptions, choice: Choice, suffixes: dict, device: str, dtype: torch.dtype) -> dict:
    """What the calibration ran with, as its folder records it (init checks its own flags against it)."""
    return {
        "target_modules": list(suffixes),
        "center": options.centred,
        "engine": {"requested": options.engine, "used": choice.engine, "reason": choice.reason},
        "batch_size": choice.batch_size,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _run(
    source: ModelSource,
    choice: Choice,
    suffixes: tuple[str, ...],
    samples: list,
    collector: Collector,
    stores: StatisticStores,
    options: CalibrationOptions,
    reporter: Reporter,
    dtype: torch.dtype,
    device: str,
    loaded: torch.nn.Module | None = None,
) -> tuple[Statistics, WeightOf]:
    """The chosen engine over this rank's samples."""
    if choice.engine == "whole":
        model = loaded
        if model is None:
            with reporter.phase("load", "Loading the whole model"):
                model = load_model(source.path, dtype, device)
        targets = find_targets(model, suffixes)
        with reporter.phase("forward_backward", "Calibrating (forward + backward)", len(samples)) as step:
            stats = whole_statistics(model, targets, samples, collector, stores, choice.batch_size, step)
        return stats, weights_from_model(model)
    with reporter.phase("load", "Loading embeddings and head"):
        streamed = StreamedModel(source.path, source.checkpoint, dtype, device, options.read_ahead)
    targets = streamed.targets(suffixes)
    stats = stream_statistics(
        streamed, targets, samples, collector, stores, options.offload_dir, reporter, choice.batch_size
    )
    return stats, weights_from_checkpoint(source.checkpoint)


def choose_engine(
    source: ModelSource,
    options: CalibrationOptions,
    num_samples: int,
    device: str,
    dtype: torch.dtype,
    reporter: Reporter,
    dist: Dist,
) -> Choice:
    """The engine and batch size from free memory where not given (sizing.py), said on stderr.

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
        options.statistics,
        free,
        batch_limit(device),
    )
    if dist.active:
        choices = dist.all_gather(choice)
        choice = next((c for c in choices if c.engine == "stream"), choice)
        choice = dataclasses.replace(choice, batch_size=min(c.batch_size for c in choices))
    reporter.info(f"engine: {choice.engine}, batch size {choice.batch_size} ({choice.reason})")
    return choice


def read_data(
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


def data_record(calib_set: CalibrationSet, options: CalibrationOptions) -> dict:
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
