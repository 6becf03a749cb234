"""`tlora`: a thin Typer layer over the library; every user error becomes one line and exit code 1.

Commands only name the options classes whose flags they take (flags.py generates the flags) and call the
library with them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .adapter.peft import read_adapter
from .calib.options import CalibrationOptions, MeasureOptions
from .data import DataOptions, datasets_plain, datasets_table, samples_plain, samples_text, show_samples
from .data.show import ShowOptions
from .distributed import is_main_process, refuse_ranks
from .errors import Stopped, TloraError, disk_full, name_too_long, printable
from .exports import FORMATS, ExportOptions, serving_facts
from .exports.run import export
from .exports.vllm import vllm_max_lora_rank
from .flags import Pick, with_options
from .methods import OPTION_CLASSES, MethodOptions
from .model.loading import load_tokenizer
from .model.resolve import ModelOptions, resolve_model
from .options import Options
from .outputs.atomic import COMMITTED, OutputOptions, atomic_file
from .outputs.card import command_line
from .outputs.upload import PublishOptions, push_folder
from .pipeline import ReuseOptions, run_allocate, run_calibrate, run_init
from .plan import AllocationOptions
from .progress import ProgressOptions, Reporter, ReportOptions
from .recipe import RecipeOptions
from .report.picture import plot_format, print_picture, write_plot
from .report.summary import InspectOptions, print_summary, summarise
from .trial.options import TrialOptions
from .trial.report import table as trial_table
from .trial.run import run_trial

EXIT_CODES = (
    "Exit codes: 0 done; 1 a bad input or environment, said in one line (nothing written); 2 a mistyped command or "
    "option; 3 an internal error (a bug: rerun with TLORA_DEBUG=1 and report it); 130 interrupted (Ctrl-C, SIGTERM)."
)
app = typer.Typer(
    help="Task-aware LoRA initialisation (TLoRA): calibrate on a few samples, allocate ranks, write a PEFT adapter.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="The calibration datasets tlora knows, and samples as the model sees them.")
app.add_typer(data_app, name="data")


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
    if ctx.invoked_subcommand not in (None, "calibrate", "init", "trial"):
        refuse_ranks(ctx.invoked_subcommand)


def _out(help_text: str) -> Pick:
    return Pick(OutputOptions, helps={"out": help_text})


def _publish(publish: PublishOptions, out: Path, reporter: Reporter) -> str | None:
    """--push-to-hub, once OUT is complete (under torchrun, rank 0 alone wrote it); the commit's URL."""
    if publish.push_to_hub is None or not is_main_process():
        return None
    url = push_folder(out, publish.push_to_hub, publish.private, publish.create_pr)
    reporter.info(f"pushed {out} to {url}")
    return url


def adapter_facts(folder: Path, servers: bool = True) -> dict:
    """An adapter folder for a CI job: where, how many modules, their ranks, and what each server needs."""
    adapter = read_adapter(folder, tensors=False)
    ranks = [m.rank for m in adapter.modules]
    facts = {
        "out": str(folder),
        "method": adapter.metadata.get("method"),
        "residual": bool(adapter.metadata.get("residual")),
        "modules": len(ranks),
        "ranks": {"min": min(ranks), "max": max(ranks), "total": sum(ranks)},
    }
    return facts | ({"servers": serving_facts(adapter, folder)} if servers else {})


def _print_json(value: dict) -> None:
    sys.stdout.write(json.dumps(value) + "\n")


@app.command("calibrate")
@with_options(
    output=_out("Calibration directory to write."),
)
def calibrate_command(
    output: OutputOptions,
    model: ModelOptions,
    data: DataOptions,
    calibration: CalibrationOptions,
    recipe: RecipeOptions,
    measure: MeasureOptions,
    progress: ProgressOptions,
) -> None:
    """Run the model on the calibration samples and save covariances and importance scores."""
    run_calibrate(
        output=output,
        model=model,
        data=data,
        calibration=calibration,
        recipe=recipe,
        measure=measure,
        reporter=Reporter(progress.quiet),
    )


@app.command("allocate")
@with_options(
    output=_out("Plan file (JSON) to write."),
)
def allocate_command(
    calibration_dir: Annotated[Path, typer.Argument(help="Directory written by `tlora calibrate`.")],
    output: OutputOptions,
    allocation: AllocationOptions,
    recipe: RecipeOptions,
    progress: ProgressOptions,
) -> None:
    """Turn importance scores into per-module ranks and alphas; writes an editable plan."""
    reporter = Reporter(progress.quiet)
    run_allocate(
        calibration_dir=calibration_dir, output=output, allocation=allocation, recipe=recipe, reporter=reporter
    )


@app.command("init")
@with_options(
    output=_out("Adapter directory to write."),
    method_options=OPTION_CLASSES,
)
def init_command(
    output: OutputOptions,
    model: ModelOptions,
    data: DataOptions,
    reuse: ReuseOptions,
    calibration: CalibrationOptions,
    allocation: AllocationOptions,
    method: MethodOptions,
    method_options: dict[type, Options],
    recipe: RecipeOptions,
    publish: PublishOptions,
    progress: ProgressOptions,
    report: ReportOptions,
) -> None:
    """Calibrate, allocate and write a PEFT adapter directory (or finish from --calibration/--plan)."""
    publish.check()  # before minutes of work: a bad repo id
    reporter = Reporter(progress.quiet)
    run_init(
        output=output,
        model=model,
        data=data,
        calibration=calibration,
        allocation=allocation,
        recipe=recipe,
        method=method,
        method_options=method_options,
        reuse=reuse,
        reporter=reporter,
    )
    pushed = _publish(publish, output.out, reporter)
    if report.as_json and is_main_process():
        _print_json({**adapter_facts(output.out), "pushed": pushed})


@app.command("trial")
@with_options(
    output=_out("Trial folder to write: trial.json, loss_curves.png and best/ (the winning start)."),
    calibration=Pick(CalibrationOptions, only=("num_samples", "seq_len", "target_modules", "device", "dtype", "seed")),
    allocation=Pick(AllocationOptions, only=("budget_rank", "alpha")),
    method_options=OPTION_CLASSES,
)
def trial_command(
    output: OutputOptions,
    model: ModelOptions,
    data: DataOptions,
    calibration: CalibrationOptions,
    allocation: AllocationOptions,
    trial: TrialOptions,
    method_options: dict[type, Options],
    progress: ProgressOptions,
    report: ReportOptions,
) -> None:
    """Which start and which learning rate win on your data: short fine-tunes scored on a held-out split."""
    reporter = Reporter(progress.quiet)
    result = run_trial(
        output=output,
        model=model,
        data=data,
        calibration=calibration,
        allocation=allocation,
        trial=trial,
        method_options=method_options,
        reporter=reporter,
    )
    if report.as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        Console(width=max(Console().width, 100)).print(trial_table(result))
    winner = result["winner"]
    reporter.info(
        f"wrote {output.out}: {winner['method']} at lr {winner['lr']:g} wins (held-out loss "
        f"{winner['heldout_loss']:.4f}); its start is {output.out}/best"
    )


@data_app.command("list")
def data_list_command() -> None:
    """The dataset names `--data` accepts, with their hub ids, fields and templates."""
    console = Console()
    if console.is_terminal:
        console.print(datasets_table())
    else:
        sys.stdout.write(datasets_plain() + "\n")


@data_app.command("show")
@with_options(
    reading=Pick(DataOptions, only=tuple(f.name for f in dataclasses.fields(DataOptions) if f.name != "data")),
    calibration=Pick(CalibrationOptions, only=("seq_len", "seed")),
)
def data_show_command(
    data: Annotated[str, typer.Argument(help="A dataset name, NAME=PATH, a file, a folder or a hub id.")],
    model: ModelOptions,
    reading: DataOptions,
    show: ShowOptions,
    calibration: CalibrationOptions,
) -> None:
    """A few samples exactly as the model will see them, the part that carries the loss marked."""
    options = dataclasses.replace(reading, data=data)
    for checked in (options, model, show, calibration):
        checked.check()
    tokenizer = load_tokenizer(resolve_model(model.model, model.revision))
    calib_set, shown = show_samples(options, tokenizer, show.count, calibration.seq_len, calibration.seed)
    console = Console()
    if console.is_terminal:
        console.print(samples_text(calib_set, shown))
    else:
        sys.stdout.write(samples_plain(calib_set, shown) + "\n")


@app.command("inspect")
@with_options()
def inspect_command(
    adapter_dir: Annotated[Path, typer.Argument(help="Adapter directory written by `tlora init`.")],
    inspect: InspectOptions,
    report: ReportOptions,
) -> None:
    """Where the budget went: a rank and scaling heatmap (layers x module types) and totals against uniform LoRA."""
    summary = summarise(adapter_dir)
    if inspect.plot is not None:
        fmt = plot_format(inspect.plot)
        with atomic_file(inspect.plot, inspect.overwrite, "picture", (("ADAPTER", adapter_dir),)) as tmp:
            write_plot(summary, tmp, Path(summary["adapter"]).name, fmt)
    if report.as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    elif inspect.modules:
        print_summary(summary, Console(width=max(Console().width, 100)))
    else:
        print_picture(summary, Console(width=max(Console().width, 100)))
    if inspect.plot is not None and not report.as_json:
        Console(stderr=True, highlight=False).print(f"wrote {inspect.plot}")


@app.command("export")
@with_options(
    output=_out("Folder to write."),
    model=Pick(
        ModelOptions, helps={"model": "merged: the base model folder or hub id. Default: the one the adapter names."}
    ),
)
def export_command(
    adapter_dir: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter directory (tlora's, or a trained one).")],
    output: OutputOptions,
    options: ExportOptions,
    model: ModelOptions,
    publish: PublishOptions,
    progress: ProgressOptions,
    report: ReportOptions,
) -> None:
    """An adapter as inference servers read it (vLLM, SGLang/TGI/LoRAX), or merged into its base model."""
    publish.check()
    reporter = Reporter(progress.quiet)
    on_shard = lambda shard: reporter.info(f"merging {shard}")  # noqa: E731
    written = export(adapter_dir, output.out, options, model, output.overwrite, command_line(), on_shard)
    reporter.info(
        f"wrote {output.out}: {options.format} export of {written.modules} modules, largest rank {written.rank}"
    )
    for warning in written.warnings:  # a wrong base, a term left out: the output may not be what was wanted
        reporter.warn(warning, protects=True)
    for hint in written.hints:
        reporter.info(hint)
    pushed = _publish(publish, output.out, reporter)
    if report.as_json:
        facts = {"format": options.format, "hints": written.hints, "warnings": written.warnings, "pushed": pushed}
        if FORMATS[options.format].kind == "adapter":
            facts |= adapter_facts(output.out, servers=False)
            facts["max_lora_rank"] = vllm_max_lora_rank(facts["ranks"]["max"])
        _print_json({"out": str(output.out), **facts})


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
    COMMITTED.clear()  # per run: an interrupt says whether this run's output was already in place
    try:
        quiet_libraries()  # imports transformers: seconds, in which Ctrl-C is as likely as anywhere
        code = app(standalone_mode=False)
    except KeyboardInterrupt:  # before Click runs a command (which turns Ctrl-C into its Abort)
        code = 130
    except TloraError as e:
        if is_main_process() or not isinstance(e, Stopped):  # under torchrun, rank 0 says why every rank stopped
            err.print(f"[red]error:[/] {escape(printable(str(e)))}", soft_wrap=True)
        sys.exit(1)
    except Exception as e:
        _unexpected(e, err)
    if code == 130 and is_main_process():  # Typer turns Ctrl-C (and our SIGTERM) into exit code 130
        err.print(_interrupted_message(), soft_wrap=True)
    sys.exit(code if isinstance(code, int) else 0)


def _unexpected(e: Exception, err: Console) -> None:
    """Usage errors (exit 2), interrupts (130), a full disk (1), anything else as an internal error (3)."""
    click_error, abort = _click_exceptions()
    if isinstance(e, click_error):  # usage errors: Click's own message (with "Did you mean"), exit 2
        e.show()
        sys.exit(e.exit_code)
    if isinstance(e, abort):
        if is_main_process():
            err.print(_interrupted_message(), soft_wrap=True)
        sys.exit(130)
    if os.environ.get("TLORA_DEBUG"):
        raise e
    if name_too_long(e):  # any path the user named: -o, --data, --model, an adapter folder
        name = printable(os.fsdecode(e.filename)) if e.filename is not None else "a path"
        err.print(
            f"[red]error:[/] {escape(name)}: a name in this path is longer than the file system allows "
            "(255 bytes on most); choose a shorter one",
            soft_wrap=True,
        )
        sys.exit(1)
    if disk_full(e):  # anywhere: calibration files, offloaded activations, the adapter
        err.print(
            "[red]error:[/] the disk filled up while writing (nothing was kept): free some space, or write -o "
            "or --offload-dir elsewhere (a Llama-2-7B calibration takes about 22 GB)",
            soft_wrap=True,
        )
        sys.exit(1)
    message = escape(printable(f"{type(e).__name__}: {e}"))
    err.print(f"[red]internal error:[/] {message}".splitlines()[0], soft_wrap=True)
    err.print("rerun with TLORA_DEBUG=1 for the traceback and report it")
    sys.exit(3)
