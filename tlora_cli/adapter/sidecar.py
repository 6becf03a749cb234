"""The adapter's sidecar: per module, tensors PEFT's format has no place for (the directions a method chose, their
change rates, and for a residual adapter the factors s B0 A0 subtracted from W). Keys are `<module>.<field>`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import TloraError
from ..model.checkpoint import header_problem
from .gate import check_written
from .layout import SIDECAR

RESIDUAL_A, RESIDUAL_B, RESIDUAL_SCALING = "residual_A", "residual_B", "residual_scaling"


def write_sidecar(folder: Path, entries: dict[str, dict[str, torch.Tensor]]) -> None:
    """Nothing is written when no module has an entry (the methods whose adapter PEFT's format holds whole)."""
    # clones: directions are views of one ranking, which safetensors refuses to save as shared memory
    tensors = {f"{name}.{field}": t.clone() for name, fields in entries.items() for field, t in fields.items()}
    check_written(tensors, SIDECAR, "the method, or the training, that made it diverged")
    if tensors:
        save_file(tensors, folder / SIDECAR, metadata={"format": "pt"})


def read_sidecar(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per module, its fields; {} for a folder without a sidecar."""
    path = folder / SIDECAR
    if not path.exists():
        return {}
    problem = header_problem(path)
    if problem:
        raise TloraError(f"cannot read {path}: {problem}; rewrite the adapter with `tlora init`")
    entries: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118
                name, _, field = key.rpartition(".")
                entries.setdefault(name, {})[field] = f.get_tensor(key)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise TloraError(f"cannot read {path}: {e}; rewrite the adapter with `tlora init`".splitlines()[0]) from e
    return entries


def residual_factors(
    entry: dict[str, torch.Tensor], name: str, path: Path, shape: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A0, B0, s) of one module of a residual adapter: W_res = W - s B0 A0, with B0 A0 of the module's `shape`."""
    missing = [f for f in (RESIDUAL_A, RESIDUAL_B, RESIDUAL_SCALING) if f not in entry]
    if missing:
        raise TloraError(f"{path / SIDECAR} lacks {name}.{missing[0]}: rewrite the adapter with `tlora init`")
    a0, b0, scaling = entry[RESIDUAL_A], entry[RESIDUAL_B], entry[RESIDUAL_SCALING]
    fits = a0.dim() == 2 and b0.dim() == 2 and b0.shape[1] == a0.shape[0] and scaling.numel() == 1
    if not fits or (shape is not None and (b0.shape[0], a0.shape[1]) != tuple(shape)):
        raise TloraError(
            f"{path / SIDECAR}: {name}'s residual factors B0 {list(b0.shape)} and A0 {list(a0.shape)} do not make "
            f"its {list(shape) if shape else 'out x in'} weight: rewrite the adapter with `tlora init`"
        )
    return a0, b0, float(scaling)


def residual_record(folder: Path) -> dict:
    """What the metadata says of a residual adapter: its base, how to train and serve it, and an id of its factors
    (a residual base written from this adapter carries the same id, so a loader can tell the two bases apart)."""
    digest = hashlib.sha256((folder / SIDECAR).read_bytes()).hexdigest()[:16]
    return {
        "base": f"W_res = W - s B0 A0 for every adapted module (B0, A0 and s in {SIDECAR}): never the unchanged model",
        "train": "tlora_cli.training.load_for_training(base, ADAPTER) subtracts s B0 A0 from the base in memory; or "
        "train on the folder `tlora export ADAPTER --format residual-base -o BASE` writes",
        "serve": "after training, `tlora export TRAINED --format lora --initial ADAPTER -o PLAIN` gives a plain LoRA "
        "on the original base, which every server and the vllm, padded and merged exports take",
        "id": digest,
    }
