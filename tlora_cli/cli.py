"""`tlora`: a thin Typer layer over the library; every user error becomes one line and exit code 1.

Commands only parse flags into the library's options objects and call `pipeline`; flags that several
commands share are declared once, as a group function whose parameters `with_flags` adds to each command.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .budget_plot import print_picture, write_plot
from .data import DataOptions, datasets_plain, datasets_table, samples_plain, samples_text, show_samples
from .distributed import is_main_process, refuse_ranks
from .errors import Stopped, TloraError, disk_full
from .export import export
from .hub_upload import push_folder
from .methods import InitOptions, methods_help
from .model_card import command_line
from .model_io import load_tokenizer, resolve_model
from .options import (
    DEFAULT_BUDGET_RANK,
    DEFAULT_NUM_SAMPLES,
    RELEASED_NUM_SAMPLES,
    AllocationOptions,
    CalibrationOptions,
)
from .output import COMMITTED
from .pipeline import run_allocate, run_calibrate, run_init
from .progress import Reporter
from .report import print_summary, summarise

app = typer.Typer(
    help="Task-aware LoRA initialisation (TLoRA): calibrate on a few samples, allocate ranks, write a PEFT adapter.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Model = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Local model folder or hub id. Default: the built-in SmolLM2-135M-Instruct."),
]
Revision = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")]
Data = Annotated[
    str | None,
    typer.Option(
        "--data",
        "-d",
        help="A file (.jsonl/.json/.parquet/.csv/.txt[.gz]), a dataset folder, a name (see `tlora data list`), "
        "NAME=PATH, or a hub id org/name. Default: the built-in math set.",
    ),
]
DataConfig = Annotated[str | None, typer.Option(help="Hub dataset config (subset).")]
DataSplit = Annotated[str | None, typer.Option(help="Hub dataset split. Default: the named set's, else train.")]
TextField = Annotated[str | None, typer.Option(help="Field holding plain text (every token carries the loss).")]
PromptField = Annotated[str | None, typer.Option(help="Field holding the prompt (no loss).")]
ResponseField = Annotated[str | None, typer.Option(help="Field holding the response (the loss).")]
Template = Annotated[str | None, typer.Option(help="Prompt format string over the record, e.g. 'Q: {question}\\nA:'.")]
ChatTemplate = Annotated[
    bool, typer.Option("--chat-template", help="Prompt as the user turn, response as the assistant turn (the loss).")
]
Streaming = Annotated[
    bool | None, typer.Option("--streaming/--no-streaming", help="Stream the hub dataset. Default: by its size.")
]
NumSamples = Annotated[
    int | None,
    typer.Option(
        help=f"Calibration samples N. Default {DEFAULT_NUM_SAMPLES} ({RELEASED_NUM_SAMPLES} with --recipe released)."
    ),
]
SeqLen = Annotated[int, typer.Option(help="Tokens per sample at most, T.")]
Targets = Annotated[
    str | None, typer.Option(help="Comma-separated module name suffixes. Default: all attention and MLP projections.")
]
Center = Annotated[
    bool | None,
    typer.Option(
        "--center/--no-center",
        help="Centre each sample's inputs (C = Cov[X], SPEC.md) or keep the uncentred second moment. "
        "Default: the method's own (centred; uncentred for lora-da and `calibrate --gradients`).",
    ),
]
Recipe = Annotated[
    str,
    typer.Option(
        help="default (SPEC.md), or released: the paper's released code (its rank rounding, alpha rule and "
        "256 samples; A trained). See README 'Reproducing the paper'."
    ),
]
Device = Annotated[str | None, typer.Option(help="cpu or cuda. Default: cuda when available.")]
Dtype = Annotated[
    str,
    typer.Option(
        help="auto|float32|bfloat16|float16|float64: the model's compute dtype and the adapter's dtype "
        "(auto: float32 on CPU, the checkpoint's on GPU; the adapter in the checkpoint's)."
    ),
]
Seed = Annotated[int, typer.Option(help="Seed of the sample selection.")]
Engine = Annotated[
    str,
    typer.Option(
        help="auto: whole if the model, its statistics and a batch fit in free memory, else stream; "
        "stream: one decoder layer on the device at a time; whole: the model in memory at once."
    ),
]
ReadAhead = Annotated[
    bool, typer.Option(help="Stream engine: read the next layer from disk while one computes (timings: load_wait).")
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        help="Samples run at once (each keeps its own importance score). "
        "Default: the most that fit, up to 8, on a GPU; 1 on CPU."
    ),
]
OffloadDir = Annotated[
    Path | None,
    typer.Option(help="Keep layer inputs, gradients and covariances in files here instead of host memory."),
]
BudgetRank = Annotated[
    int | None, typer.Option(help=f"r_init: the budget is L * r_init ranks. Default {DEFAULT_BUDGET_RANK}.")
]


def _finite(value: float | None) -> float | None:
    """NaN and inf parse as floats; as an alpha or a hyper-parameter they would reach the adapter."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


Alpha = Annotated[
    float | None,
    typer.Option(help="LoRA alpha per module; alpha_total = L * alpha. Default: r_init.", callback=_finite),
]
MinRank = Annotated[
    int | None, typer.Option(help="Smallest rank a module may get (0 lets a module go without adapter).")
]
Uniform = Annotated[
    bool, typer.Option("--uniform", help="Every module r_init and alpha (TLoRA init only, no allocation).")
]
RankAllocation = Annotated[bool, typer.Option(help="Allocate ranks by importance (off: r_init everywhere).")]
AlphaAllocation = Annotated[bool, typer.Option(help="Allocate alphas by importance (off: alpha everywhere).")]
Method = Annotated[str, typer.Option(help=methods_help())]
Damping = Annotated[
    float, typer.Option(help="theory, lora-da: damping added to C (and to the Fisher diagonal).", callback=_finite)
]
LoraDaBeta = Annotated[
    float, typer.Option(help="lora-da: weight of the variance term (released config: 0.03).", callback=_finite)
]
LoraDaPopulation = Annotated[int, typer.Option(help="lora-da: N, the number of fine-tuning examples.")]
Gradients = Annotated[
    bool, typer.Option("--gradients", help="Also save the gradient statistics that `--method lora-da` needs.")
]
TrainA = Annotated[
    bool | None,
    typer.Option("--train-a/--freeze-a", help="Recorded for the training helper. Default: frozen, trained for random."),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages.")]
PushToHub = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        metavar="REPO_ID",
        help="Then publish OUT to this hub model repo (created if needed) in one commit; token and endpoint as "
        "huggingface_hub finds them.",
    ),
]
Private = Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the repo private.")]
CreatePr = Annotated[bool, typer.Option("--create-pr", help="With --push-to-hub: open a pull request instead.")]


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"tlora {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Task-aware LoRA initialisation (TLoRA): calibrate on a few samples, allocate ranks, write a PEFT adapter."""
    if ctx.invoked_subcommand not in (None, "calibrate", "init"):
        refuse_ranks(ctx.invoked_subcommand)


def with_flags(*groups: Callable[..., Any]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Each parameter of the command named after a group stands for that group's flags: the command gets
    them in its place on the command line, and is called with what the group returns from them."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        by_name = {group.__name__: group for group in groups}
        members: dict[str, list[str]] = {}
        params: list[inspect.Parameter] = []
        for param in inspect.signature(command, eval_str=True).parameters.values():
            if param.name not in by_name:
                params.append(param)
                continue
            flags = list(inspect.signature(by_name[param.name], eval_str=True).parameters.values())
            members[param.name] = [flag.name for flag in flags]
            params += flags
        params = [param.replace(kind=inspect.Parameter.KEYWORD_ONLY) for param in params]

        @functools.wraps(command)
        def run(**kwargs: Any) -> None:
            for name, flags in members.items():
                kwargs[name] = by_name[name](**{flag: kwargs.pop(flag) for flag in flags})
            command(**kwargs)

        del run.__wrapped__  # Typer reads the signature below, not the command's
        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {param.name: param.annotation for param in params}
        return run

    return decorate


@dataclasses.dataclass
class Publish:
    """Where OUT goes once written (--push-to-hub); parsed, and so checked, before any work starts."""

    repo_id: str | None
    private: bool
    create_pr: bool

    def push(self, out: Path, reporter: Reporter) -> None:
        if self.repo_id is not None and is_main_process():  # under torchrun, rank 0 alone wrote OUT
            reporter.info(f"pushed {out} to {push_folder(out, self.repo_id, self.private, self.create_pr)}")


def publish_flags(push_to_hub: PushToHub = None, private: Private = False, create_pr: CreatePr = False) -> Publish:
    """The hub flags that init and export share."""
    if push_to_hub is None and (private or create_pr):
        raise TloraError("--private and --create-pr go with --push-to-hub REPO_ID")
    return Publish(push_to_hub, private, create_pr)


def data_flags(
    data_config: DataConfig = None,
    data_split: DataSplit = None,
    text_field: TextField = None,
    prompt_field: PromptField = None,
    response_field: ResponseField = None,
    template: Template = None,
    chat_template: ChatTemplate = False,
    streaming: Streaming = None,
) -> dict[str, Any]:
    """How to read --data: DataOptions' fields but the data itself."""
    return {
        "config": data_config,
        "split": data_split,
        "text_field": text_field,
        "prompt_field": prompt_field,
        "response_field": response_field,
        "template": template,
        "chat_template": chat_template,
        "streaming": streaming,
    }


def calibration_flags(
    num_samples: NumSamples = None,
    seq_len: SeqLen = 512,
    target_modules: Targets = None,
    center: Center = None,
    device: Device = None,
    dtype: Dtype = "auto",
    seed: Seed = 0,
    engine: Engine = "auto",
    batch_size: BatchSize = None,
    read_ahead: ReadAhead = True,
    offload_dir: OffloadDir = None,
) -> dict[str, Any]:
    """CalibrationOptions' fields that calibrate and init share."""
    return dict(locals())


def allocation_flags(
    budget_rank: BudgetRank = None,
    alpha: Alpha = None,
    min_rank: MinRank = None,
    uniform: Uniform = False,
    rank_allocation: RankAllocation = True,
    alpha_allocation: AlphaAllocation = True,
) -> dict[str, Any]:
    """AllocationOptions' fields but the recipe."""
    return dict(locals())


@app.command("calibrate")
@with_flags(data_flags, calibration_flags)
def calibrate_command(
    *,
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibration directory to write.")],
    model: Model = None,
    data: Data = None,
    data_flags: dict[str, Any],
    calibration_flags: dict[str, Any],
    recipe: Recipe = "default",
    gradients: Gradients = False,
    revision: Revision = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Run the model on the calibration samples and save covariances and importance scores."""
    options = CalibrationOptions(**calibration_flags, gradients=gradients, recipe=recipe)
    run_calibrate(out, model, revision, DataOptions(data, **data_flags), options, overwrite, Reporter(quiet))


@app.command("allocate")
@with_flags(allocation_flags)
def allocate_command(
    *,
    calibration_dir: Annotated[Path, typer.Argument(help="Directory written by `tlora calibrate`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Plan file (JSON) to write.")],
    allocation_flags: dict[str, Any],
    recipe: Recipe = "default",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Turn importance scores into per-module ranks and alphas; writes an editable plan."""
    options = AllocationOptions(**allocation_flags, recipe=recipe)
    run_allocate(calibration_dir, out, options, overwrite, Reporter(quiet))


@app.command("init")
@with_flags(data_flags, allocation_flags, calibration_flags, publish_flags)
def init_command(
    *,
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter directory to write.")],
    model: Model = None,
    data: Data = None,
    data_flags: dict[str, Any],
    calibration_dir: Annotated[
        Path | None,
        typer.Option("--calibration", help="Reuse a `tlora calibrate` directory instead of running the model."),
    ] = None,
    plan: Annotated[Path | None, typer.Option(help="Use ranks and alphas from a `tlora allocate` plan.")] = None,
    allocation_flags: dict[str, Any],
    calibration_flags: dict[str, Any],
    method: Method = "tlora",
    damping: Damping = 1e-6,
    lora_da_beta: LoraDaBeta = 0.03,
    lora_da_population: LoraDaPopulation = 100_000,
    train_a: TrainA = None,
    recipe: Recipe = "default",
    revision: Revision = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    publish_flags: Publish,
) -> None:
    """Calibrate, allocate and write a PEFT adapter directory (or finish from --calibration/--plan)."""
    reporter = Reporter(quiet)
    run_init(
        out,
        model,
        revision,
        DataOptions(data, **data_flags),
        calibration_dir,
        plan,
        AllocationOptions(**allocation_flags, recipe=recipe),
        InitOptions(method, damping, train_a, calibration_flags["seed"], lora_da_beta, lora_da_population, recipe),
        CalibrationOptions(**calibration_flags, recipe=recipe),
        overwrite,
        reporter,
    )
    publish_flags.push(out, reporter)


data_app = typer.Typer(help="The calibration datasets tlora knows, and samples as the model sees them.")
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list_command() -> None:
    """The dataset names `--data` accepts, with their hub ids, fields and templates."""
    console = Console()
    if console.is_terminal:
        console.print(datasets_table())
    else:
        sys.stdout.write(datasets_plain() + "\n")


@data_app.command("show")
@with_flags(data_flags)
def data_show_command(
    *,
    data: Annotated[str, typer.Argument(help="A dataset name, NAME=PATH, a file, a folder or a hub id.")],
    model: Model = None,
    data_flags: dict[str, Any],
    num_samples: Annotated[int, typer.Option(help="How many samples to show.")] = 3,
    seq_len: SeqLen = 512,
    seed: Seed = 0,
    revision: Revision = None,
) -> None:
    """A few samples exactly as the model will see them, the part that carries the loss marked."""
    options = DataOptions(data, **data_flags)
    options.check()
    tokenizer = load_tokenizer(resolve_model(model, revision))
    calib_set, shown = show_samples(options, tokenizer, num_samples, seq_len, seed)
    console = Console()
    if console.is_terminal:
        console.print(samples_text(calib_set, shown))
    else:
        sys.stdout.write(samples_plain(calib_set, shown) + "\n")


@app.command("inspect")
def inspect_command(
    adapter_dir: Annotated[Path, typer.Argument(help="Adapter directory written by `tlora init`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    modules: Annotated[
        bool, typer.Option("--modules", help="Every module's rank, alpha, scaling and parameters, as a table.")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Also draw rank and scaling per layer and type into this PNG (matplotlib).")
    ] = None,
) -> None:
    """Where the budget went: a rank and scaling heatmap (layers x module types) and totals against uniform LoRA."""
    summary = summarise(adapter_dir)
    if plot is not None:
        write_plot(summary, plot)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    elif modules:
        print_summary(summary, Console(width=max(Console().width, 100)))
    else:
        print_picture(summary, Console(width=max(Console().width, 100)))
    if plot is not None and not as_json:
        Console(stderr=True, highlight=False).print(f"wrote {plot}")


@app.command("export")
@with_flags(publish_flags)
def export_command(
    *,
    adapter_dir: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter directory (tlora's, or a trained one).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write.")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="vllm: scalings folded into B, per-module ranks kept; padded: also one rank, no patterns (SGLang, "
            "TGI, LoRAX); merged: a full checkpoint W + s B A, shard by shard.",
        ),
    ] = "vllm",
    rank: Annotated[
        int | None, typer.Option(help="padded: the rank to pad to. Default: the adapter's largest.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="merged: the base model folder or hub id. Default: the one the adapter names."
        ),
    ] = None,
    revision: Revision = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    publish_flags: Publish,
) -> None:
    """An adapter as inference servers read it (vLLM, SGLang/TGI/LoRAX), or merged into its base model."""
    reporter = Reporter(quiet)
    result = export(
        adapter_dir,
        out,
        fmt,
        model,
        revision,
        rank,
        overwrite,
        command_line(),
        lambda shard: reporter.info(f"merging {shard}"),
    )
    reporter.info(f"wrote {out}: {result.fmt} export of {result.modules} modules, largest rank {result.rank}")
    for warning in result.warnings:
        reporter.warn(warning)
    for hint in result.hints:
        reporter.info(hint)
    publish_flags.push(out, reporter)


def quiet_libraries() -> None:
    """Our own bars say what happens; transformers' loading bars and advice would only add noise."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Click's usage-error and abort classes: Typer >= 0.24 raises those of its own vendored copy."""
    import click

    errors: list[type] = [click.exceptions.ClickException]
    aborts: list[type] = [click.exceptions.Abort]
    try:
        from typer._click import exceptions as vendored

        errors.append(vendored.ClickException)
        aborts.append(vendored.Abort)
    except (ImportError, AttributeError):
        pass
    return tuple(errors), tuple(aborts)


def _interrupted_message() -> str:
    """An interrupt after an output was put in place must not say that nothing was written."""
    if COMMITTED:
        return f"interrupted: {COMMITTED[-1]} had already been written in full"
    return "interrupted: nothing was written"


def main() -> None:
    """Entry point: one line per error, never a traceback (TLORA_DEBUG=1 shows it)."""
    err = Console(stderr=True, highlight=False)
    quiet_libraries()
    COMMITTED.clear()  # per run: an interrupt says whether this run's output was already in place
    try:
        code = app(standalone_mode=False)
    except TloraError as e:
        if is_main_process() or not isinstance(e, Stopped):  # under torchrun, rank 0 says why every rank stopped
            err.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(1)
    except Exception as e:
        click_error, abort = _click_exceptions()
        if isinstance(e, click_error):  # usage errors: Click's own message (with "Did you mean"), exit 2
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, abort):
            if is_main_process():
                err.print(_interrupted_message(), soft_wrap=True)
            sys.exit(130)
        if os.environ.get("TLORA_DEBUG"):
            raise
        if disk_full(e):  # anywhere: calibration files, offloaded activations, the adapter
            err.print(
                "[red]error:[/] the disk filled up while writing (nothing was kept): free some space, or write -o "
                "or --offload-dir elsewhere (a Llama-2-7B calibration takes about 22 GB)",
                soft_wrap=True,
            )
            sys.exit(1)
        err.print(f"[red]internal error:[/] {escape(type(e).__name__ + ': ' + str(e))}".splitlines()[0], soft_wrap=True)
        err.print("rerun with TLORA_DEBUG=1 for the traceback and report it")
        sys.exit(3)
    if code == 130 and is_main_process():  # Typer turns Ctrl-C (and our SIGTERM) into exit code 130
        err.print(_interrupted_message(), soft_wrap=True)
    sys.exit(code if isinstance(code, int) else 0)
