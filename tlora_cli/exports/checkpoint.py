"""A base checkpoint written again with some of its weights changed, shard by shard under the base's own shard names
and index (one shard in memory at a time), with its config, tokenizer and small files beside them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import TloraError
from ..model.checkpoint import Checkpoint, open_shard

# Files of a model folder that are weights in another format, or not ours to copy into a written checkpoint.
SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
SKIP_NAMES = {"README.md", ".gitattributes", "tlora-conversion.json"}
Change = Callable[[torch.Tensor], torch.Tensor]


def write_checkpoint(
    base: Path,
    folder: Path,
    changes: dict[str, tuple[list[int], Change]],
    on_shard: Callable[[str], None] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """`changes`: per weight name, the shape it must have and the function that gives its new value (in float32 or
    wider). Every floating tensor is written in `dtype` (None: each in its own), and config.json says so."""
    checkpoint = Checkpoint(base)
    _check_base(checkpoint, changes, base)
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
                target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                if name in changes:
                    tensor = changes[name][1](tensor)
                tensors[name] = tensor.to(target).contiguous()
            shard_metadata = f.metadata() or {"format": "pt"}
        save_file(tensors, folder / file.name, metadata=shard_metadata)
        del tensors
    for item in sorted(base.iterdir()):
        if item.is_file() and not item.name.endswith((".safetensors", *SKIP_SUFFIXES)) and item.name not in SKIP_NAMES:
            shutil.copyfile(item, folder / item.name)  # follows the hub cache's symlinks
    if dtype is not None:
        _set_config_dtype(folder / "config.json", dtype)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    """The dtype transformers loads the checkpoint in by default (`dtype`, and the older `torch_dtype` if there)."""
    config = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_base(checkpoint: Checkpoint, changes: dict[str, tuple[list[int], Change]], base: Path) -> None:
    """Every changed weight is a tensor of the base, of the shape the adapter has for it."""
    missing = [k for k in changes if k not in checkpoint.files]
    if missing:
        raise TloraError(
            f"the base model {base} has no tensor {missing[0]}: is it the model this adapter was made for? "
            "(pass the right one with --model)"
        )
    for key, (shape, _) in changes.items():
        with open_shard(checkpoint.files[key]) as f:
            found = list(f.get_slice(key).get_shape())
        if found != shape:
            raise TloraError(
                f"the base model's {key} is {found}, but the adapter's B A is {shape}: "
                "is it the model this adapter was made for?"
            )
