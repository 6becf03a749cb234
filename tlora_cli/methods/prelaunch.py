"""The pre-launch phase of LoRA-Init, LoRA-Dash and LoRA-TSD (SPEC.md, "Task-specific directions"): a plain LoRA of
rank r_init and alpha on the targets, trained for a few optimizer steps on --data, whose dW = s B A shows which of W's
singular directions the task moves."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calib.calibrate import data_record, weights_from_model
from ..calib.folder import Calibration
from ..calib.sizing import ModelSize, batch_limit, free_memory
from ..calib.statistics import Statistics
from ..data import EncodedSample, load_calibration_set
from ..model.checkpoint import read_config
from ..model.loading import load_model, load_tokenizer, pick_device, pick_dtype
from ..model.targets import Target, find_targets, parse_suffixes
from ..options import Options, at_least, option, positive
from ..train import memory
from ..train.loop import Plan, Schedule, train
from ..train.lora import LoraWeights, attached, kaiming_start
from .base import ModuleInit, Preparation, Prepared

FAMILY = "lora-init, lora-dash, lora-tsd"


@dataclass
class PrelaunchOptions(Options):
    prelaunch_steps: int | None = option(
        None, f"{FAMILY}: optimizer steps of the pre-launch LoRA. Default 100.", check=at_least(1), fallback=100
    )
    prelaunch_lr: float | None = option(
        None,
        f"{FAMILY}: its learning rate, warmed up linearly over the steps. Default 2e-4.",
        check=positive,
        fallback=2e-4,
    )
    prelaunch_batch_size: int | None = option(
        None,
        f"{FAMILY}: samples per step (split into micro-batches when memory is short). Default 16.",
        check=at_least(1),
        fallback=16,
    )
    save_prelaunch: Path | None = option(
        None, f"{FAMILY}: also write the pre-launch LoRA here, a plain PEFT adapter.", recorded=False
    )


def cycled(available: int, needed: int, seed: int) -> list[int]:
    """`needed` sample indices: the set in its own (seeded) order, then again in a new seeded order per pass."""
    order = list(range(available))
    passes = 0
    while len(order) < needed:
        passes += 1
        again = list(range(available))
        random.Random(f"{seed}:{passes}").shuffle(again)
        order += again
    return order[:needed]


def prelaunch(p: Preparation) -> Prepared:
    """Train the pre-launch LoRA on the whole model; every rank holds the same result."""
    options = p.options[PrelaunchOptions]
    steps, lr = options.value("prelaunch_steps"), options.value("prelaunch_lr")
    batch = options.value("prelaunch_batch_size")
    device = pick_device(p.calibration.device)
    dtype = pick_dtype(p.calibration.dtype, p.source.path, device)
    calib_set = _samples(p, steps * batch)
    order = cycled(len(calib_set.samples), steps * batch, p.calibration.seed)
    batches = [[calib_set.samples[i] for i in order[k * batch : (k + 1) * batch]] for k in range(steps)]
    model = p.model
    if model is None:
        with p.reporter.phase("load", "Loading the whole model"):
            model = load_model(p.source.path, dtype, device)
    suffixes = parse_suffixes(p.calibration.target_modules, read_config(p.source.path).get("model_type", ""))
    targets = find_targets(model, suffixes)
    weights = {t.name: kaiming_start(t.name, t.shape, p.rank, p.alpha, p.calibration.seed).to(device) for t in targets}
    plan = _plan(p, weights, share=len(p.dist.share(batch)), dtype=dtype, device=device)
    p.reporter.info(
        f"pre-launch: {steps} steps of {batch} samples ({len(calib_set.samples)} distinct), rate {lr:g} warmed up over "
        f"the steps; micro-batch {plan.micro_batch} ({plan.reason})"
    )
    parameters = [t for w in weights.values() for t in (w.a, w.b)]
    with (
        attached(dict(model.named_modules()), weights),
        p.reporter.phase("prelaunch", "Pre-launch LoRA", steps) as step,
    ):
        shown = lambda loss: step(description=f"Pre-launch LoRA (loss {loss:.4f})")  # noqa: E731
        losses = train(model, parameters, batches, Schedule(steps, lr, warmup=steps), plan, p.dist, shown)
    state = {name: LoraWeights(w.a.detach().cpu(), w.b.detach().cpu(), w.scaling) for name, w in weights.items()}
    record = {
        "steps": steps,
        "lr": lr,
        "warmup": "linear over every step: step k at (k + 1) / steps of the rate",
        "batch_size": batch,
        "micro_batch": plan.micro_batch,
        "gradient_checkpointing": plan.checkpointing,
        "distinct_samples": len(calib_set.samples),
        "passes": -(-steps * batch // len(calib_set.samples)),
        "losses": losses,
    }
    calibration = _record(p, calib_set, targets, suffixes, device, dtype, record)
    side = prelaunch_adapter(state) if options.save_prelaunch is not None else None
    return Prepared(calibration, weights_from_model(model), state, side)


def _samples(p: Preparation, count: int):
    """The samples given, or `count` of --data, encoded as the calibration set is."""
    if p.samples is not None:
        return p.samples
    with p.reporter.phase("data", "Reading the pre-launch data"):
        tokenizer = load_tokenizer(p.source.path)
        return load_calibration_set(p.data, tokenizer, count, p.calibration.seq_len, p.calibration.seed)


def _plan(p: Preparation, weights: dict[str, LoraWeights], share: int, dtype: torch.dtype, device: str) -> Plan:
    """How this rank's share of a batch runs, from the model's size and the device's free memory."""
    trained = sum(w.a.numel() + w.b.numel() for w in weights.values())
    size = ModelSize.of(read_config(p.source.path), p.source.checkpoint.num_elements())
    limit = batch_limit(device)
    return memory.plan(size, free_memory(device), share, p.calibration.seq_len, dtype.itemsize, trained, limit, device)


def _record(
    p: Preparation,
    calib_set,
    targets: list[Target],
    suffixes: tuple[str, ...],
    device: str,
    dtype: torch.dtype,
    prelaunch: dict,
) -> Calibration:
    """What the metadata says of the pre-launch: its data, its settings, its loss curve (no statistics)."""
    samples: list[EncodedSample] = calib_set.samples
    stats = Statistics(
        targets=targets,
        input_of={t.name: t.name for t in targets},
        tensors={},
        scores={t.name: 0.0 for t in targets},
        num_samples=len(samples),
        num_tokens=sum(len(s.input_ids) for s in samples),
    )
    settings = {
        "target_modules": list(suffixes),
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "prelaunch": prelaunch,
        **({"distributed": p.dist.record(prelaunch["batch_size"])} if p.dist.active else {}),
    }
    model = {"name": p.source.name, "fingerprint": p.source.checkpoint.fingerprint, **p.source.provenance()}
    data = {**calib_set.provenance, **data_record(calib_set, p.calibration)}
    return Calibration(stats, model, data, settings, dict(p.reporter.timings))


def prelaunch_adapter(state: dict[str, LoraWeights]) -> dict[str, ModuleInit]:
    """The pre-launch LoRA as adapter starts, for --save-prelaunch."""
    return {name: ModuleInit(w.a, w.b) for name, w in state.items()}


def saved_prelaunch(options: dict[type, Options]) -> Path | None:
    return options[PrelaunchOptions].save_prelaunch
