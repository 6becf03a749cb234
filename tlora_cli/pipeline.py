"""The stages as a library: calibrate -> allocate -> factorise -> write. The CLI only parses flags."""

from __future__ import annotations

import contextlib
import datetime
import platform
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from . import __version__
from .adapter import write_adapter, write_metadata
from .allocation import ModuleAllocation, allocate, allocate_released, check_uniform_min_rank
from .calibration import Calibration
from .data import DataOptions, load_calibration_set, rank_warning
from .errors import TloraError
from .factorisation import lora_da_a, random_a, theory_a, tlora_a, w_svd_a
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
from .progress import Reporter
from .statistics import Statistics, compute_statistics
from .streaming import StreamedModel, stream_statistics
from .targets import find_targets, parse_suffixes

WeightOf = Callable[[str], torch.Tensor]

RECIPES = ("default", "released")
RELEASED_NUM_SAMPLES = 256  # math_train.py's dataset.select(range(256))


def method_center(method: str) -> bool:
    """The covariance each method's own paper defines: TLoRA's Cov[X] is centred (per sample, as the
    released code computes it); LoRA-DA's K-FAC factor E[x x^T] is the uncentred second moment."""
    return method != "lora-da"


def covariance_kind(center: bool) -> str:
    return "covariance centred per sample" if center else "uncentred second moment"


@dataclass
class CalibrationOptions:
    num_samples: int = 32
    seq_len: int = 512
    target_modules: str | None = None
    center: bool = True  # SPEC.md: Cov[X], centred per sample; False gives the uncentred second moment
    device: str | None = None
    dtype: str = "auto"
    seed: int = 0
    engine: str = "stream"
    offload_dir: Path | None = None
    gradients: bool = False  # also collect what --method lora-da needs
    covariances: bool = True  # False for methods that never read C (random, w-svd)

    def check(self) -> None:
        """Fail on bad settings before any model is read."""
        if self.seq_len < 2:
            raise TloraError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.num_samples < 1:
            raise TloraError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.engine not in ("stream", "whole"):
            raise TloraError(f"--engine must be stream or whole, got {self.engine!r}")
        if self.offload_dir is not None and not self.offload_dir.is_dir():
            raise TloraError(f"--offload-dir {self.offload_dir} is not an existing folder: create it first")


@dataclass
class AllocationOptions:
    budget_rank: int = 8
    alpha: float | None = None
    min_rank: int = 0
    rank_allocation: bool = True
    alpha_allocation: bool = True
    recipe: str = "default"

    def check(self) -> None:
        """Fail on bad allocation flags before minutes of calibration."""
        if self.recipe not in RECIPES:
            raise TloraError(f"--recipe must be one of {', '.join(RECIPES)}; got {self.recipe!r}")
        if self.recipe == "released" and (self.min_rank or not (self.rank_allocation and self.alpha_allocation)):
            raise TloraError(
                "--recipe released allocates ranks and alphas its own way: drop --min-rank, --uniform, "
                "--no-rank-allocation and --no-alpha-allocation"
            )
        allocate(["x"], [(self.budget_rank, self.budget_rank)], [1.0], self.budget_rank, self.alpha, self.min_rank)
        check_uniform_min_rank(self.rank_allocation, self.budget_rank, self.min_rank)


METHODS = ("tlora", "w-svd", "random", "theory", "lora-da")


@dataclass
class InitOptions:
    """How A is built. train_a=None: the method's own recipe (A trained for random, frozen otherwise)."""

    method: str = "tlora"
    damping: float = 1e-6
    train_a: bool | None = None
    seed: int = 0
    lora_da_beta: float = 0.03  # the released LoRA-DA config's weight on the variance term
    lora_da_population: int = 100_000  # N: the size of the fine-tuning set, not of the calibration set
    recipe: str = "default"

    def check(self) -> None:
        if self.recipe == "released" and self.method != "tlora":
            raise TloraError(f"--recipe released reproduces TLoRA's released code: drop --method {self.method}")
        if self.method not in METHODS:
            raise TloraError(f"--method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not self.damping > 0:
            raise TloraError(f"--damping must be positive, got {self.damping:g}")
        if self.lora_da_beta < 0 or self.lora_da_population < 1:
            raise TloraError("--lora-da-beta must be >= 0 and --lora-da-population >= 1")

    @property
    def uses_covariances(self) -> bool:
        return self.method not in ("random", "w-svd")

    @property
    def trains_a(self) -> bool:
        """The released code trains A with B (get_peft_model makes every lora_ weight trainable)."""
        if self.train_a is not None:
            return self.train_a
        return self.method == "random" or self.recipe == "released"


@dataclass
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
) -> tuple[Calibration, WeightOf]:
    """Statistics per SPEC.md, streamed layer by layer (or on the whole model with engine="whole").

    Statistics go to files under `stats_dir` as they are finished when one is given (a calibration
    directory being written, or scratch space in --offload-dir), else they stay in host memory.
    Returns how to read each target's weight, for the factorisation that follows.
    """
    options.check()
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, source.path, device)
    suffixes = parse_suffixes(options.target_modules, read_config(source.path).get("model_type", ""))
    with reporter.phase("data", "Reading calibration data"):
        tokenizer = load_tokenizer(source.path)
        calib_set = load_calibration_set(data, tokenizer, options.num_samples, options.seq_len, options.seed)
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
    if calib_set.num_available < options.num_samples:
        reporter.warn(
            f"{calib_set.source} has only {calib_set.num_available} samples; using all of them "
            f"instead of --num-samples {options.num_samples}"
        )
    if options.engine == "whole":
        with reporter.phase("load", "Loading the whole model"):
            model = load_model(source.path, dtype, device)
        targets = find_targets(model, suffixes)
        with reporter.phase("forward_backward", "Calibrating (forward + backward)", len(calib_set.samples)) as step:
            stats = compute_statistics(
                model, targets, calib_set.samples, options.center, step, options.gradients, options.covariances
            )
        weight_of = weights_from_model(model)
    else:
        with reporter.phase("load", "Loading embeddings and head"):
            streamed = StreamedModel(source.path, source.checkpoint, dtype, device)
        targets = streamed.targets(suffixes)
        stats = stream_statistics(
            streamed,
            targets,
            calib_set.samples,
            options.center,
            options.offload_dir,
            stats_dir,
            reporter,
            options.gradients,
            options.covariances,
        )
        weight_of = weights_from_checkpoint(source.checkpoint)
    with reporter.phase("fingerprint", "Fingerprinting the model"):
        fingerprint = source.checkpoint.fingerprint
    calibration = Calibration(
        stats=stats,
        model={"name": source.name, "fingerprint": fingerprint},
        data={
            **calib_set.provenance,
            "source": calib_set.source,
            "num_skipped": calib_set.num_skipped,
            "sha256": calib_set.sha256,
            "num_samples": len(calib_set.samples),
            "num_available": calib_set.num_available,
            "num_tokens": calib_set.num_tokens,
            "num_loss_tokens": calib_set.num_loss_tokens,
            "seq_len": options.seq_len,
            "seed": options.seed,
        },
        settings={
            "target_modules": list(suffixes),
            "center": options.center,
            "engine": options.engine,
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
        },
        timings=dict(reporter.timings),
    )
    return calibration, weight_of


@contextlib.contextmanager
def stats_scratch(offload_dir: Path | None) -> Iterator[Path | None]:
    """With --offload-dir, a folder there for the statistics until the adapter is written; gone afterwards."""
    if offload_dir is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="tlora-statistics-", dir=offload_dir) as folder:
        yield Path(folder)


def allocate_modules(stats: Statistics, options: AllocationOptions) -> list[ModuleAllocation]:
    names, shapes = [t.name for t in stats.targets], [t.shape for t in stats.targets]
    scores = [stats.scores[t.name] for t in stats.targets]
    if options.recipe == "released":
        return allocate_released(names, shapes, scores, options.budget_rank, options.alpha)
    return allocate(
        names,
        shapes,
        scores,
        rank=options.budget_rank,
        alpha=options.alpha,
        min_rank=options.min_rank,
        rank_allocation=options.rank_allocation,
        alpha_allocation=options.alpha_allocation,
    )


def allocation_settings(options: AllocationOptions, num_modules: int) -> dict:
    alpha = float(options.budget_rank if options.alpha is None else options.alpha)
    return {
        **asdict(options),
        "alpha": alpha,
        "budget": num_modules * options.budget_rank,
        "alpha_total": num_modules * alpha,
    }


def weights_from_model(model: torch.nn.Module) -> WeightOf:
    modules = dict(model.named_modules())
    return lambda name: modules[name].weight.detach()


def weights_from_checkpoint(checkpoint: Checkpoint) -> WeightOf:
    def weight_of(name: str) -> torch.Tensor:
        key = f"{name}.weight"
        if key not in checkpoint.files:
            raise TloraError(f"the checkpoint has no tensor {key}: was the calibration made from this model?")
        return checkpoint.get(key)

    return weight_of


def factorise(
    allocations: list[ModuleAllocation],
    stats: Statistics,
    weight_of: WeightOf,
    device: str,
    options: InitOptions,
    on_module: Callable[[], None] | None = None,
) -> dict[str, torch.Tensor]:
    """A_i for every module with r_i > 0; each covariance is read once and reused by its siblings."""
    result: dict[str, torch.Tensor] = {}
    cached_key, cov = None, None
    for a in allocations:
        if a.rank and options.method == "random":
            seed = zlib.crc32(f"{options.seed}:{a.name}".encode())  # per module: independent of order
            result[a.name] = random_a(a.in_features, a.rank, torch.Generator().manual_seed(seed))
        elif a.rank and options.method == "w-svd":
            result[a.name] = w_svd_a(weight_of(a.name).to(device), a.rank).cpu()
        elif a.rank:
            key = stats.input_of[a.name]
            if key != cached_key:
                cov = None  # released before the next is read, which may compute a whole layer again
                cached_key, cov = key, stats.covariances[key].to(device)
            if options.method == "lora-da":
                result[a.name] = _lora_da(a, stats, cov, device, options)
            elif options.method == "theory":
                result[a.name] = theory_a(weight_of(a.name).to(device), cov, a.rank, options.damping).cpu()
            else:
                result[a.name] = tlora_a(weight_of(a.name).to(device), cov, a.rank).cpu()
        if on_module:
            on_module()
    return result


def _lora_da(
    a: ModuleAllocation, stats: Statistics, cov: torch.Tensor, device: str, options: InitOptions
) -> torch.Tensor:
    check_gradients(stats)
    grad, out_sq = stats.mean_grads[a.name].to(device), stats.output_grad_sq[a.name].to(device)
    try:
        matrix = lora_da_a(cov, out_sq, grad, a.rank, options.lora_da_beta, options.lora_da_population, options.damping)
    except ValueError as e:
        raise TloraError(f"LoRA-DA cannot initialise {a.name}: {e}") from e
    return matrix.cpu()


def package_versions() -> dict[str, str]:
    versions = {"tlora": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "safetensors", "peft", "huggingface-hub", "datasets"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def metadata(
    calibration: Calibration,
    allocations: list[ModuleAllocation],
    allocation: dict,
    init: InitOptions,
    adapter_dtype: torch.dtype,
    timings: dict,
) -> dict:
    """Everything the tool knows about the run, kept out of adapter_config.json (SPEC.md)."""
    return {
        "tool": "tlora",
        "method": init.method,
        "train_a": init.trains_a,
        **({"damping": init.damping} if init.method in ("theory", "lora-da") else {}),
        **(
            {"lora_da_beta": init.lora_da_beta, "lora_da_population": init.lora_da_population}
            if init.method == "lora-da"
            else {}
        ),
        "recipe": init.recipe,
        **({"released_recipe": released_departures(calibration, allocations)} if init.recipe == "released" else {}),
        "covariance": covariance_kind(calibration.settings.get("center", False)) if init.uses_covariances else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": calibration.model,
        "data": calibration.data,
        "calibration": {
            **calibration.settings,
            "num_samples": calibration.stats.num_samples,
            "num_tokens": calibration.stats.num_tokens,
        },
        "allocation": allocation,
        "adapter_dtype": str(adapter_dtype).removeprefix("torch."),
        "modules": [a.as_dict() for a in allocations],
        "versions": package_versions(),
        "timings": timings,
    }


def check_gradients(stats: Statistics) -> None:
    if stats.mean_grads is None or stats.output_grad_sq is None:
        raise TloraError(
            "--method lora-da needs gradient statistics: calibrate with `tlora calibrate --gradients`, "
            "or run `tlora init --method lora-da` without --calibration"
        )


def check_calibration(calibration: Calibration, init: InitOptions, center: bool, explicit: bool, where: str) -> None:
    """`init --calibration` finishes only from the statistics its method reads (SPEC.md): the gradient
    statistics for lora-da, and never the centred covariance for the uncentred moment or the reverse."""
    if init.method == "lora-da":
        check_gradients(calibration.stats)
    if not init.uses_covariances:
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


def released_departures(calibration: Calibration, allocations: list[ModuleAllocation]) -> dict:
    """What `--recipe released` changed from the default, and where this run still differs from the released code."""
    differs = ["covariance accumulated in float32 (the released code accumulates in bfloat16)"]
    if calibration.stats.num_samples != RELEASED_NUM_SAMPLES:
        differs.append(f"{calibration.stats.num_samples} samples (the released code uses {RELEASED_NUM_SAMPLES})")
    left_out = [a.name for a in allocations if not a.rank]
    if left_out:
        differs.append(f"{len(left_out)} modules with rank 0 left out (the released code builds rank-0 layers)")
    return {
        "changed_from_default": [
            "ranks: round(R p_i), the leftover to the module with the largest rank (default: largest remainder)",
            "scaling: max(alpha, round(alpha_total p_i)) / r_init (default: alpha_total p_i / r_init)",
            "A trained with B (default: A frozen)",
            f"{RELEASED_NUM_SAMPLES} samples unless --num-samples says otherwise (default: 32)",
        ],
        "differs_from_released": differs,
    }


def adapter_dtype(dtype: str, source: ModelSource) -> torch.dtype:
    return checkpoint_dtype(source.path) if dtype == "auto" else pick_dtype(dtype, source.path, "cpu")


def initialise(
    folder: Path,
    source: ModelSource,
    calibration: Calibration,
    allocations: list[ModuleAllocation],
    allocation: dict,
    weight_of: WeightOf,
    options: CalibrationOptions,
    init: InitOptions,
    reporter: Reporter,
    card_name: str | None = None,
) -> None:
    """Factorise and write the adapter into `folder` (the caller makes it appear atomically); `card_name` titles
    its model card (the folder's final name)."""
    active = sum(1 for a in allocations if a.rank)
    largest = max(a.rank for a in allocations)
    warning = rank_warning(calibration.stats.num_tokens, largest)
    if warning:
        reporter.warn(warning)
    device = pick_device(options.device)
    with reporter.phase("factorisation", f"Building A ({init.method})", len(allocations)) as step:
        a_matrices = factorise(allocations, calibration.stats, weight_of, device, init, step)
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
