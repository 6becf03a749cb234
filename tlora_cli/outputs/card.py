"""README.md model cards for adapter folders (init, export, a trained adapter) and full checkpoints.

The front matter is huggingface_hub's ModelCardData (what the Hub reads: base_model and base_model_relation, the
license of the base, library_name, pipeline_tag, tags, datasets); the body says how the adapter was made, how to
train it and how to serve it. Nothing in a card names a local path: a base or data folder goes by its name.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from huggingface_hub import ModelCardData
from huggingface_hub.repocard import metadata_load

from ..adapter.layout import CARD, CONFIG, METADATA, PLOT
from ..jsonio import maybe_object
from ..methods import METHODS
from ..methods.base import Method
from ..model.resolve import looks_like_hub_id
from ..names import published
from ..report.picture import try_write_plot


def command_line() -> str | None:
    """The `tlora ...` command this process runs, when it is the CLI (None from a library call), every path in it
    cut to its name: a card is published."""
    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    if argv0 == "tlora" or sys.argv[0].endswith(("tlora_cli/__main__.py", "tlora_cli")):
        return shlex.join(["tlora", *(published(a) for a in sys.argv[1:])])
    return None


def front_matter(
    base_model: str | None,
    relation: str,
    library: str,
    datasets: list[str],
    extra_tags: list[str],
    license: str | None = None,
) -> str:
    """The card's YAML header. `relation` is the Hub's base_model_relation: adapter, or finetune for a checkpoint
    with an adapter merged in ("merge" is the Hub's word for merging several models)."""
    tags = ["tlora", "lora", "transformers", *(["peft"] if library == "peft" else []), *extra_tags]
    if base_model:
        tags.append(f"base_model:{relation}:{base_model}")
    data = ModelCardData(
        base_model=base_model,
        license=license,
        library_name=library,
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),
        datasets=datasets or None,
        **({"base_model_relation": relation} if base_model else {}),
    )
    return f"---\n{data.to_yaml()}\n---\n"


def is_tlora_card(path: Path) -> bool:
    """A README.md tlora wrote: its front matter tags it "tlora" (this version's or an older one's); a trainer's
    card is not."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 1 << 20:
            return False
        tags = metadata_load(path) or {}
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    found = tags.get("tags") if isinstance(tags, dict) else None
    return isinstance(found, list) and "tlora" in found


def _license(meta: dict) -> str | None:
    """The base model's license, as calibration found it (its card, or the built-in model's)."""
    found = (meta.get("model") or {}).get("license")
    return found if isinstance(found, str) and found else None


def _datasets(meta: dict) -> list[str]:
    hub_id = (meta.get("data") or {}).get("hub_id")
    return [hub_id] if isinstance(hub_id, str) and hub_id else []


def _made(meta: dict, command: str | None) -> list[str]:
    """'How it was made' rows, from tlora_metadata.json."""
    rows = [("command", f"`{command}`")] if command else []
    rows += _measured(meta)
    origin = (meta.get("model") or {}).get("converted_from")
    if origin:
        rows.append(("base weights", f"dequantised from `{origin}`, not the hub's bf16 checkpoint: A was computed "
                     "from these weights"))  # fmt: skip
    trained = meta.get("trained") or {}
    if trained:
        rows.append(("trained", f"yes, from the adapter `{trained.get('from', '?')}` tlora wrote"))
    if meta.get("method"):
        rows.append(("method", meta["method"]))
        rows.append(("recipe", meta.get("recipe", "default")))
    if meta.get("covariance"):
        rows.append(("covariance", meta["covariance"]))
    center = (meta.get("calibration") or {}).get("center")
    if center is not None and not meta.get("covariance"):
        rows.append(("covariance", "centred" if center else "uncentred"))
    if "train_a" in meta:
        rows.append(("A in training", "trained" if meta["train_a"] else "frozen"))
    trial = meta.get("trial") or {}
    if trial.get("lr"):
        steps = f" in a {trial['steps']}-step trial" if trial.get("steps") else ""
        loss = f"{trial['lr']:g}: held-out loss {trial['heldout_loss']:.4f}{steps}"
        rows.append(("learning rate (tlora trial)", f"{loss}, the best of its methods and rates (a longer run wants a "
                     "lower rate)"))  # fmt: skip
    version = (meta.get("versions") or {}).get("tlora")
    if version:
        rows.append(("tlora", version))
    return [f"| {k} | {v} |" for k, v in rows]


def _measured(meta: dict) -> list[tuple[str, str]]:
    """The rows of what it was measured on: data, budget, ranks."""
    data = meta.get("data") or {}
    allocation, modules = meta.get("allocation") or {}, meta.get("modules") or []
    ranks = [m["rank"] for m in modules if m.get("rank")]
    rows = []
    if data:
        hub = f" (hub: {data['hub_id']})" if data.get("hub_id") else ""
        rows.append(("data", f"`{data.get('source', '?')}`{hub}"))
        rows.append(("samples N", f"{data.get('num_samples', '?')} of {data.get('num_available', '?')}"))
        rows.append(
            ("tokens per sample T", f"{data.get('seq_len', '?')} at most; {data.get('num_tokens', '?')} tokens in all")
        )
    if allocation:
        rows.append(
            (
                "budget",
                f"r_init {allocation.get('budget_rank')} x {len(modules)} modules = {allocation.get('budget')} ranks, "
                f"alpha_total {allocation.get('alpha_total'):g}"
                if isinstance(allocation.get("alpha_total"), int | float)
                else f"r_init {allocation.get('budget_rank')}",
            )
        )
    if ranks:
        rows.append(("ranks", f"{min(ranks)}-{max(ranks)} over {len(ranks)} of {len(modules)} modules"))
    return rows


def adapter_card(
    folder: Path,
    command: str | None = None,
    plot: bool = False,
    name: str | None = None,
    serving: str = "",
    export_note: str | None = None,
) -> str:
    """The card for an adapter folder, from its adapter_config.json and tlora_metadata.json. `serving`: how to
    export it for servers (an adapter from init); `export_note`: what an export's format did (an export)."""
    config, meta = maybe_object(folder / CONFIG) or {}, maybe_object(folder / METADATA) or {}
    named = config.get("base_model_name_or_path")
    base = named if looks_like_hub_id(named) else None
    base_name = published(named) if isinstance(named, str) and named else None
    fmt = (meta.get("export") or {}).get("format")
    tags = [f"export:{fmt}"] if fmt else ["trained"] if meta.get("trained") else []
    text = front_matter(base, "adapter", "peft", _datasets(meta), tags, _license(meta))
    text += f"\n# {name or folder.name}\n\n"
    if meta.get("residual") and not fmt:
        text += residual_warning(name or folder.name)
    text += _introduction(base, base_name, meta, exported=bool(fmt) or bool(meta.get("trained")))
    if meta.get("dash_directions") and not fmt:
        text += dash_note(meta)
    if fmt:
        text += f"\nThis is the `{fmt}` export (`tlora export --format {fmt}`): {export_note}\n"
        if command:
            text += f"\nExported with `{command}`.\n"
    made = _made(meta, command if not fmt else None)
    if made:
        text += "\n## How it was made\n\n| | |\n|---|---|\n" + "\n".join(made) + "\n"
    if plot:
        text += f"\n## Where the budget went\n\n![rank and scaling per layer and module type]({PLOT})\n"
    if fmt:
        return text
    text += _training(base or base_name or "BASE_MODEL", not meta.get("train_a", False))
    return text + (
        "\n## Serving it\n\n"
        "PEFT loads it as it is (and so does training). Inference servers apply one scaling to every module, "
        f"so export it first, after training:\n\n```bash\n{serving}```\n"
    )


def residual_warning(name: str) -> str:
    """The first lines of a residual adapter's card: PEFT cannot be stopped from loading it on the unchanged model,
    which gives W + s B A, not W."""
    return (
        "> **A residual adapter: do not load it on the unchanged base model.** It was made by LoRA-Init, whose A and "
        "B hold W's own top task-specific directions: its base is W_res = W - s B0 A0 (the factors are in "
        "`tlora_directions.safetensors`). On the unchanged model it adds those directions a second time. Train it "
        "with `tlora_cli.training.load_for_training(base, ADAPTER)`, which makes W_res in memory, or on the model "
        f"`tlora export {name} --format residual-base -o BASE` writes; serve it after "
        f"`tlora export TRAINED --format lora --initial {name} -o PLAIN`.\n\n"
    )


def dash_note(meta: dict) -> str:
    """What a trainer that ignores the sidecar gets, and how the term reaches a server."""
    plain = "LoRA-Init's residual adapter" if meta.get("residual") else "the plain LoRA"
    return (
        f"\nIt carries LoRA-Dash's term: a trainable coefficient on each of W's top {meta['dash_directions']} "
        "task-specific directions per module (u, v and the coefficients in `tlora_directions.safetensors`). "
        "`tlora_cli.training.load_for_training` attaches it and `save_trained` keeps it; a trainer that ignores the "
        f"sidecar trains {plain} without it. For serving, fold it into a plain LoRA with "
        "`tlora export TRAINED --format lora`.\n"
    )


def _introduction(base: str | None, base_name: str | None, meta: dict, exported: bool) -> str:
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{base_name or 'its base model'}`"
    text = f"A LoRA adapter (PEFT) for {base_text}"
    if meta.get("tool") != "tlora" and not meta.get("method"):
        return text + ".\n"
    name = meta.get("method") or "tlora"
    method = METHODS.get(name)
    how = (
        "task-aware LoRA (TLoRA), whose A matrices and per-module ranks come from the model's activations on a few "
        "task samples"
        if name == "tlora"
        else (method.summary if method else name)
    )
    text += f", initialised by [tlora](https://pypi.org/project/tlora-cli/) with `--method {name}`: {how}."
    return text + ("\n" if exported else f" {_start(method)}\n")


def _start(method: Method | None) -> str:
    """What the untrained adapter does to the model: a card must not promise "unchanged" where B starts non-zero."""
    if method is not None and method.residual:
        return "A and B start non-zero, on the residual base: with it, the model starts unchanged."
    if method is not None and method.changes_model:
        return "A and B are the pre-launch LoRA's as it left them, so the adapter already changes the model."
    return "B starts at zero, so before training the adapter leaves the model unchanged."


def _training(base: str, frozen: bool) -> str:
    how = (
        "TLoRA trains B only: A stays as initialised. `load_for_training` loads the adapter with A "
        "frozen (as buffers, so no optimizer or weight decay touches them):\n"
        if frozen
        else "This adapter's recipe trains A with B; `load_for_training` follows it:\n"
    )
    return (
        "\n## Training it\n\n"
        + how
        + "\n```python\nfrom transformers import AutoModelForCausalLM\nfrom tlora_cli.training import "
        "load_for_training\n\n"
        f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
        'model = load_for_training(base, "path/to/this/adapter")  # a PeftModel, ready for any trainer\n```\n'
        "\nPass that model to the trainer (TRL: `SFTTrainer(model=model, ...)`), never "
        "`peft_config=LoraConfig.from_pretrained(...)`: TRL would start a new adapter from it (this one's A lost, and "
        "with the saved `inference_mode: true`, nothing trained at all). A trainer that loads the adapter itself "
        "takes `tlora_cli.training.KeepLoraAFrozen(ADAPTER)` in its callbacks.\n"
    )


def merged_card(folder: Path, base: str | None, adapter_meta: dict, adapter: str) -> str:
    text = front_matter(base, "finetune", "transformers", _datasets(adapter_meta), ["merged"], _license(adapter_meta))
    base_text = f"[{base}](https://huggingface.co/{base})" if base else "The base model"
    text += (
        f"\n# {folder.name}\n\n"
        f"{base_text} with a LoRA adapter merged into its weights (W + s B A for every adapted module), written "
        f"by `tlora export --format merged` from `{adapter}`. Load it like the base model; serve it with any "
        "server, no LoRA support needed.\n"
    )
    made = _made(adapter_meta, None)
    if made:
        text += "\n## How the adapter was made\n\n| | |\n|---|---|\n" + "\n".join(made) + "\n"
    return text


def residual_base_card(folder: Path, base: str | None, adapter_meta: dict, adapter: str) -> str:
    text = front_matter(
        base, "finetune", "transformers", _datasets(adapter_meta), ["residual-base"], _license(adapter_meta)
    )
    base_text = f"[{base}](https://huggingface.co/{base})" if base else "the base model"
    text += (
        f"\n# {folder.name}\n\n"
        f"> **Not a model to use on its own.** This is {base_text} with the top task-specific directions of the "
        f"residual adapter `{adapter}` taken out of its weights (W_res = W - s B0 A0, written by `tlora export "
        f"--format residual-base`). Load `{adapter}` on it to train: the pair starts exactly where the base model "
        "is. After training, `tlora export TRAINED --format lora --initial ADAPTER` gives a plain LoRA on the "
        "original base, for serving.\n"
    )
    made = _made(adapter_meta, None)
    if made:
        text += "\n## How the adapter was made\n\n| | |\n|---|---|\n" + "\n".join(made) + "\n"
    return text


def write_card(
    folder: Path,
    command: str | None = None,
    name: str | None = None,
    serving: str = "",
    export_note: str | None = None,
) -> None:
    """README.md (and budget.png when matplotlib is installed) in an adapter folder being written; `name` is
    the folder's final name (it is written under a temporary one)."""
    plot = try_write_plot(folder, folder / PLOT, name)
    (folder / CARD).write_text(adapter_card(folder, command, plot, name, serving, export_note))
