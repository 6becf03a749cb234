"""A base checkpoint written again with some of its weights changed, shard by shard under the base's own shard paths
and index (one shard in memory at a time), with the files a checkpoint needs beside them (config, tokenizer)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapter.gate import cast
from ..errors import TloraError
from ..model.checkpoint import Checkpoint, open_shard

# The files of a model folder that a checkpoint needs besides its weights; nothing else is copied (a stray file, or a
# link to a private key, must never land in an output that --push-to-hub publishes).
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "qwen.tiktoken",
    "tiktoken.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "LICENSE",
    "LICENSE.txt",
    "LICENSE.md",
    "NOTICE",
    "USE_POLICY.md",
)
CHAT_TEMPLATES = "additional_chat_templates"  # transformers' folder of named chat templates (*.jinja)
# The new value of a changed weight, computed in float32 from the base's; the tensor gate writes it in the base's dtype.
Change = Callable[[torch.Tensor], torch.Tensor]


def write_checkpoint(
    base: Path,
    folder: Path,
    changes: dict[str, tuple[list[int], Change]],
    advice: str,
    on_shard: Callable[[str], None] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """`changes`: per weight name, the shape it must have and the function that gives its new value (in float32 or
    wider); `advice`: what to do when a new value does not fit the dtype written. Every floating tensor is written in
    `dtype` (None: each in its own), and config.json says so. Shards keep their paths relative to the base (an index
    may put them in subfolders)."""
    checkpoint = Checkpoint(base)
    _check_base(checkpoint, changes, base)
    by_file: dict[Path, list[str]] = {}
    for name, file in checkpoint.files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        relative = file.relative_to(base)
        if on_shard:
            on_shard(relative.as_posix())
        tensors = {}
        with open_shard(file) as f:
            for name in names:
                tensor = f.get_tensor(name)
                target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                if name in changes:
                    tensor = changes[name][1](tensor)
                if name in changes or tensor.dtype != target:
                    tensor = cast(tensor, target, f"the new {name}", advice)
                tensors[name] = tensor.contiguous()
            shard_metadata = f.metadata() or {"format": "pt"}
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / relative, metadata=shard_metadata)
        del tensors
    copy_model_files(base, folder)
    if dtype is not None:
        _set_config_dtype(folder / "config.json", dtype)


def model_root(base: Path) -> Path:
    """The folder a model's files may link into: its own, or for a hub cache snapshot (models--org--name/snapshots/
    REV) the repo's cache folder, whose blobs/ the snapshot's links point to."""
    real = Path(os.path.realpath(base))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def copy_model_files(base: Path, folder: Path) -> None:
    """The base's CHECKPOINT_FILES (and named chat templates) into `folder`, links followed only within the model's
    own folder: a file that leads outside it is refused, never copied."""
    root = model_root(base)
    listed = [base / name for name in CHECKPOINT_FILES if (base / name).exists() or (base / name).is_symlink()]
    listed += sorted((base / CHAT_TEMPLATES).glob("*.jinja")) if (base / CHAT_TEMPLATES).is_dir() else []
    for item in listed:
        real = Path(os.path.realpath(item))
        if not real.is_relative_to(root):
            raise TloraError(
                f"{item} leads to {real}, outside the model folder {root}: tlora copies no file from outside it; "
                "put the file itself in its place"
            )
        if not real.is_file():
            raise TloraError(f"{item} is not a file (a folder, or a link to nothing): re-download the model")
        target = folder / item.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real, target)


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
