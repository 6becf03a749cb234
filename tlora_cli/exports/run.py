"""`tlora export`: any PEFT LoRA adapter as a server reads it, written whole or not at all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..adapter.peft import read_adapter, read_config
from ..errors import TloraError
from ..model.resolve import ModelOptions
from ..outputs.atomic import atomic_dir
from ..outputs.ownership import run_inputs
from . import FORMATS, ExportOptions
from .base import ExportJob, Written, unconverted
from .merged import merged_base

FLAGS = {"rank": "--rank", "initial": "--initial", "model": "--model", "revision": "--revision"}


def export(
    adapter_dir: Path,
    out: Path,
    options: ExportOptions,
    model: ModelOptions | None = None,
    overwrite: bool = False,
    command: str | None = None,
    on_shard: Callable[[str], None] | None = None,
) -> Written:
    """Write OUT in the chosen format, with a model card; refuses in one line before anything is written."""
    model = model or ModelOptions()
    options.check()
    model.check()
    fmt = FORMATS[options.format]
    given = {"rank": options.rank, "initial": options.initial, "model": model.model, "revision": model.revision}
    for field, flag in FLAGS.items():
        if given[field] is not None and field not in fmt.reads:
            readers = [f.name for f in FORMATS.values() if field in f.reads]
            raise TloraError(f"{flag} goes with --format {' or '.join(readers)}, not with --format {fmt.name}")
    if out.resolve() == adapter_dir.resolve():
        raise TloraError(f"-o {out} is the adapter itself: write the export to another folder")
    refuse_unexportable(read_config(adapter_dir), adapter_dir)
    adapter = read_adapter(adapter_dir)  # before a base model is resolved or downloaded
    kind = unconverted(adapter)
    if kind and not fmt.residual:
        raise TloraError(
            f"{adapter_dir} is {kind}, which a --format {fmt.name} export would get wrong; convert it first: "
            f"`tlora export {adapter_dir} --format lora -o PLAIN`, then export PLAIN"
        )
    if fmt.check:
        fmt.check(adapter)
    base, hub_id = merged_base(adapter, model) if "model" in fmt.reads else (None, None)
    inputs = (
        ("ADAPTER", adapter_dir),
        ("--initial", options.initial),
        *run_inputs(model.model, builtin_model="model" in fmt.reads),
        ("adapter's base model", base),  # the one --model names, or the adapter's base_model_name_or_path
    )
    with atomic_dir(out, overwrite, fmt.kind, inputs) as tmp:
        flags = {"rank": options.rank, "initial": options.initial, "dtype": options.torch_dtype}
        job = ExportJob(
            adapter, tmp, out, model, **flags, command=command, on_shard=on_shard, base=base, base_hub_id=hub_id
        )
        return fmt.write(job)


def refuse_unexportable(config: dict, folder: Path) -> None:
    """One line for an adapter whose effect a plain LoRA server (or a merge) would not reproduce."""
    why = _refusal(config)
    if why:
        raise TloraError(f"cannot export {folder}: {why}")


def _refusal(config: dict) -> str | None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        return f"it is a {peft_type} adapter; only LoRA adapters export"
    if config.get("use_dora"):
        return "it is a DoRA adapter: its magnitude vector rescales W, which no LoRA server applies"
    if config.get("modules_to_save"):
        saved = ", ".join(map(str, config["modules_to_save"]))
        return f"it saves whole modules ({saved}), which a LoRA server cannot load"
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        return "it trains biases, which a LoRA server cannot load"
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        return "it mixes rsLoRA with rank or alpha patterns, whose scaling servers do not reproduce"
    if config.get("fan_in_fan_out"):
        return "it is for a fan-in/fan-out (Conv1D) model, which the exported formats do not describe"
    if config.get("layer_replication"):
        return "it replicates layers, which a LoRA server cannot do"
    if config.get("target_parameters"):
        return "it targets parameters rather than modules (target_parameters)"
    return None
