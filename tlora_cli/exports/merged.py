"""`--format merged`: W + s_i B_i A_i for every adapted module, written shard by shard under the base's own shard
names and index (one shard in memory at a time), with the base's config, tokenizer and small files beside them."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..adapter.layout import CARD, CONFIG
from ..adapter.peft import LoraModule, PeftAdapter
from ..errors import TloraError
from ..model.builtin import BUILTIN_HUB_ID, builtin_model_path
from ..model.checkpoint import Checkpoint, open_shard
from ..model.resolve import ModelOptions, base_hub_id, resolve_model
from ..outputs.card import merged_card
from .base import ExportFormat, ExportJob, Written

# Files of a model folder that are weights in another format, or not ours to copy into a merged checkpoint.
SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
SKIP_NAMES = {"README.md", ".gitattributes", "tlora-conversion.json"}


def write(job: ExportJob) -> Written:
    base, hub_id = merged_base(job.adapter, job.model)
    modules = job.adapter.modules
    write_merged(modules, base, job.folder, job.on_shard)
    meta = job.adapter.metadata
    (job.folder / CARD).write_text(merged_card(job.out, hub_id, meta, str(job.adapter.folder)))
    warnings = []
    calibrated = (meta.get("model") or {}).get("fingerprint")
    if calibrated and Checkpoint(base).fingerprint != calibrated:
        warnings.append(f"{base} is not the model this adapter was calibrated on (its weights differ): merged anyway")
    return Written(
        len(modules), max(m.rank for m in modules), [f"serve it like any model: vllm serve {job.out}"], warnings
    )


def write_merged(modules: list[LoraModule], base: Path, folder: Path, on_shard=None) -> None:
    """W + s_i B_i A_i for every adapted module, one base shard in memory at a time, under the base's names,
    index and dtype; the base's config, tokenizer and other small files copied beside them."""
    checkpoint = Checkpoint(base)
    by_weight = {f"{m.name}.weight": m for m in modules}
    _check_base(checkpoint, by_weight, base)
    by_file: dict[Path, list[str]] = {}
    for name, file in checkpoint.files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        if on_shard:
            on_shard(file.name)
        tensors = {}
        with open_shard(file) as f:
            for name in names:
                tensor = f.get_tensor(name)
                m = by_weight.get(name)
                if m is not None:
                    tensor = (tensor.float() + m.delta()).to(tensor.dtype)
                tensors[name] = tensor.contiguous()
            shard_metadata = f.metadata() or {"format": "pt"}
        save_file(tensors, folder / file.name, metadata=shard_metadata)
        del tensors
    for item in sorted(base.iterdir()):
        if item.is_file() and not item.name.endswith((".safetensors", *SKIP_SUFFIXES)) and item.name not in SKIP_NAMES:
            shutil.copyfile(item, folder / item.name)  # follows the hub cache's symlinks


def _check_base(checkpoint: Checkpoint, by_weight: dict[str, LoraModule], base: Path) -> None:
    """Every adapted module is a tensor of the base, of the shape B A has."""
    missing = [k for k in by_weight if k not in checkpoint.files]
    if missing:
        raise TloraError(
            f"the base model {base} has no tensor {missing[0]}: is it the model this adapter was made for? "
            "(pass the right one with --model)"
        )
    for key, m in by_weight.items():
        with open_shard(checkpoint.files[key]) as f:
            shape = list(f.get_slice(key).get_shape())
        if shape != [m.out_features, m.in_features]:
            raise TloraError(
                f"the base model's {key} is {shape}, but the adapter's B A is {[m.out_features, m.in_features]}: "
                "is it the model this adapter was made for?"
            )


def merged_base(adapter: PeftAdapter, model: ModelOptions) -> tuple[Path, str | None]:
    """The base model folder a merge reads, and its hub id: --model; else the folder tlora calibrated on (its
    metadata); else `base_model_name_or_path` (the built-in model's hub id means the built-in copy)."""
    if model.model is not None:
        path = resolve_model(model.model, model.revision)
        return path, base_hub_id(model.model, path)
    calibrated = (adapter.metadata.get("model") or {}).get("name")
    named = adapter.config.get("base_model_name_or_path")
    if isinstance(calibrated, str) and Path(calibrated).is_dir() and model.revision is None:
        path = Path(calibrated)
    elif named == BUILTIN_HUB_ID and model.revision is None:
        path = builtin_model_path()
    elif isinstance(named, str) and named:
        path = resolve_model(named, model.revision)
    else:
        raise TloraError(f"{adapter.folder / CONFIG} names no base model: pass it with --model")
    return path, base_hub_id(named if isinstance(named, str) else None, path)


FORMAT = ExportFormat(
    "merged",
    "a full checkpoint W + s B A, shard by shard",
    "tlora export ADAPTER -o MERGED --format merged          # servers without LoRA: W + s B A",
    write,
    kind="merged",
    reads=frozenset({"model", "revision"}),
)
