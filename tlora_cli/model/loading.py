"""The whole model and its tokenizer through transformers, and the device and dtype a run computes in."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import TloraError
from .checkpoint import DTYPES, checkpoint_dtype


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers fail in many ways; the user needs one line
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise TloraError(
            f"cannot load the tokenizer from {path} ({reason}): the model folder needs its tokenizer files "
            "(tokenizer.json or tokenizer.model, tokenizer_config.json); copy them from the base model"
        ) from e


def load_model(path: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The whole model, eval mode, frozen: the plain path that fits in memory."""
    from transformers import AutoModelForCausalLM

    try:
        model, report = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except Exception as e:  # corrupt shards, unknown architectures, missing files
        raise TloraError(f"cannot load the model from {path}: {e}".splitlines()[0]) from e
    check_load_report(report, path)
    model.requires_grad_(False)
    return model.to(device).eval()


def check_load_report(report: dict, path: Path) -> None:
    """transformers fills a tensor missing from the checkpoint with random numbers: a different adapter on
    every run. Missing or mismatched tensors are an error instead."""
    for kind, advice in (("missing_keys", "is missing"), ("mismatched_keys", "has the wrong shape")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in report.get(kind) or ())
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise TloraError(
                f"the checkpoint in {path}: tensor {keys[0]}{more} {advice}, and transformers would fill it "
                "with random numbers: re-download or re-save the model"
            )


def pick_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TloraError("--device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise TloraError(f"--device must be cpu or cuda, got {device!r}")
    return device


def pick_dtype(dtype: str, path: Path, device: str) -> torch.dtype:
    """auto: the checkpoint's dtype on a GPU; float32 on CPU, where bf16/fp16 matmuls are slow."""
    if dtype == "auto":
        return checkpoint_dtype(path) if device != "cpu" else torch.float32
    if dtype not in DTYPES:
        raise TloraError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]
