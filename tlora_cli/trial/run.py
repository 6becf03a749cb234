"""`tlora trial` as one call: carve the split, load the model once, build every method's start, run the arms, write
TRIAL (trial.json, the loss curves, and best/: the winning start as an adapter folder)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from ..calib.options import CalibrationOptions
from ..calib.sizing import ModelSize, batch_limit, free_memory
from ..data import DataOptions
from ..distributed import Dist, launched
from ..errors import TloraError
from ..jsonio import dump
from ..methods import METHODS, OPTION_CLASSES
from ..methods.prelaunch import PrelaunchOptions
from ..model.checkpoint import read_config
from ..model.loading import load_model, load_tokenizer, pick_device, pick_dtype
from ..model.resolve import ModelOptions, ModelSource
from ..names import published
from ..options import Options
from ..outputs.atomic import OutputOptions, atomic_dir
from ..outputs.ownership import TRIAL_BEST as BEST
from ..outputs.ownership import TRIAL_CURVES as CURVES
from ..outputs.ownership import TRIAL_RESULT as RESULT
from ..outputs.ownership import run_inputs
from ..pipeline import Write, check_all, write_output
from ..plan import AllocationOptions
from ..progress import Reporter
from ..train import memory
from ..train.loop import heldout_loss
from .arms import Runner, first_rates, more_rates, run_round
from .options import CLIP, TrialOptions, rates
from .report import summary, write_curves
from .split import carve
from .starts import Inputs, build_starts


def run_trial(
    *,
    output: OutputOptions,
    model: ModelOptions,
    data: DataOptions,
    calibration: CalibrationOptions,
    allocation: AllocationOptions,
    trial: TrialOptions,
    method_options: dict[type, Options] | None = None,
    reporter: Reporter,
) -> dict:
    """Returns the result (what trial.json holds); under torchrun the arms are shared out, rank 0 writes."""
    options = {c: (method_options or {}).get(c) or c() for c in OPTION_CLASSES}
    check_all(model, data, calibration, allocation, trial, *options.values())
    names = trial.method_names
    _check_flags(names, options, allocation)
    device = pick_device(calibration.device)
    with launched(device) as dist, _folder(dist, output, run_inputs(model.model, data.data)) as tmp:
        source = ModelSource.open(model.model, model.revision)
        dtype = pick_dtype(calibration.dtype, source.path, dist.device)
        pool = max(calibration.samples, trial.steps * trial.trial_batch_size, _prelaunch_samples(names, options))
        with reporter.phase("data", "Reading the data"):
            tokenizer = load_tokenizer(source.path)
            split = carve(data, tokenizer, trial.eval_samples, pool, calibration.seq_len, calibration.seed)
        reporter.info(
            f"{source.name}: {len(split.heldout.samples)} samples held out, {len(split.pool.samples)} to calibrate, "
            f"pre-launch and train on, from {split.pool.source}"
        )
        with reporter.phase("load", "Loading the whole model"):
            loaded = load_model(source.path, dtype, dist.device)
        calibration = _calibration(calibration, dist.device)
        starts = build_starts(names, Inputs(source, loaded, split, calibration, allocation, options, reporter))
        with reporter.phase("baseline", "Scoring the model without an adapter"):
            baseline = heldout_loss(loaded, split.heldout.samples)
        runner = _runner(loaded, split, trial, calibration, source, dtype, starts, reporter)
        results = _arms(runner, {n: s.start for n, s in starts.items()}, trial, names, dist)
        result = summary(results, baseline)
        result["settings"] = _settings(trial, calibration, allocation, source, names)
        result["split"] = split.record()
        if tmp is not None:
            _write(tmp, result, starts, source, calibration, output.out, reporter)
    return result


def _check_flags(names: list[str], options: dict[type, Options], allocation: AllocationOptions) -> None:
    """A method flag that no chosen method reads, and allocation flags beyond the budget, are refused."""
    for cls, value in options.items():
        given = value.given()
        readers = [n for n in names if cls in METHODS[n].options]
        if given and not readers:
            raise TloraError(f"{given[0]} is read by none of --methods {','.join(names)}: drop it")
    extra = [flag for flag in allocation.given() if flag not in ("--budget-rank", "--alpha")]
    if extra:
        raise TloraError(f"tlora trial allocates as each method does by default: drop {extra[0]}")


def _prelaunch_samples(names: list[str], options: dict[type, Options]) -> int:
    if not any(METHODS[n].prepare for n in names):
        return 0
    pre = options[PrelaunchOptions]
    return pre.value("prelaunch_steps") * pre.value("prelaunch_batch_size")


def _calibration(calibration: CalibrationOptions, device: str) -> CalibrationOptions:
    return dataclasses.replace(calibration, device=device, engine="whole")


def _runner(loaded, split, trial, calibration, source, dtype, starts, reporter) -> Runner:
    trained = max(sum(w.a.numel() + w.b.numel() for w in s.start.weights.values()) for s in starts.values())
    size = ModelSize.of(read_config(source.path), source.checkpoint.num_elements())
    device = str(next(loaded.parameters()).device)
    plan = memory.plan(
        size, free_memory(device), trial.trial_batch_size, calibration.seq_len, dtype.itemsize, trained,
        batch_limit(device), device,
    )  # fmt: skip
    batches = split.batches(trial.steps, trial.trial_batch_size, calibration.seed)
    return Runner(loaded, batches, split.heldout.samples, trial.steps, trial.warmup, plan, reporter)


def _arms(runner: Runner, starts: dict, trial: TrialOptions, names: list[str], dist: Dist) -> list:
    """Round after round: the first grid of every method (or the fixed rates), then rates past the edges."""
    fixed = rates(trial.lrs)
    results, tried = [], {n: {} for n in names}
    pending = [(n, lr) for n in names for lr in (fixed or first_rates(METHODS[n].lr))]
    while pending:
        done = run_round(runner, pending, starts, dist)
        results += done
        for r in done:
            tried[r.method][r.lr] = r.heldout_loss
        pending = [] if fixed else [(n, lr) for n in names for lr in more_rates(tried[n], METHODS[n].lr)]
    return results


def _settings(trial, calibration, allocation, source, names) -> dict:
    return {
        "methods": names,
        "lrs": trial.lrs,
        "steps": trial.steps,
        "batch_size": trial.trial_batch_size,
        "warmup": trial.warmup,
        "clip": CLIP,
        "eval_samples": trial.eval_samples,
        "num_samples": calibration.samples,
        "seq_len": calibration.seq_len,
        "seed": calibration.seed,
        "budget_rank": allocation.rank,
        "alpha": allocation.alpha_value,
        "model": published(source.name),
    }


def _write(tmp: Path, result: dict, starts: dict, source, calibration, out: Path, reporter: Reporter) -> None:
    (tmp / RESULT).write_text(dump(result))
    write_curves(result, tmp / CURVES)
    winner = result["winner"]
    best = starts[winner["method"]]
    (tmp / BEST).mkdir()
    write = Write(tmp / BEST, source, f"{out.name}/{BEST}", calibration.dtype, calibration.device)
    steps = result["settings"]["steps"]
    record = {"trial": {**winner, "steps": steps, "best_per_method": result["best"], "trial": out.name}}
    write_output(write, best.calibration, best.allocations, best.settings, best.init, best.inits, reporter, record)


def _folder(dist: Dist, output: OutputOptions, inputs: tuple) -> contextlib.AbstractContextManager:
    if not dist.is_main:
        return contextlib.nullcontext()
    return atomic_dir(output.out, output.overwrite, "trial", inputs)
