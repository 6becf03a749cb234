"""Whether a training run fits the device, and how: the largest micro-batch that fits whole, else gradient
checkpointing, else a refusal that names the shortfall, decided before the first step."""

from __future__ import annotations

from ..calib.sizing import MARGIN, ModelSize
from ..errors import TloraError
from .loop import Plan

ADAM_COPIES = 4  # a trained float32 tensor, its gradient and AdamW's two moments


def plan(
    size: ModelSize | None,
    free: int | None,
    batch: int,
    seq_len: int,
    element: int,
    trained: int,
    limit: int,
    device: str,
) -> Plan:
    """`trained`: elements of the trained tensors; `limit`: the largest micro-batch worth running (calib.sizing's
    batch_limit: 1 on CPU, where one sample fills the cores)."""
    largest = max(1, min(batch, limit))
    if size is None or free is None:
        why = "config.json does not give the model's shape" if size is None else "free memory is unknown"
        return Plan(1, False, f"{why}: one sample at a time")
    room = MARGIN * free
    fixed = size.num_params * element + trained * 4 * ADAM_COPIES
    for micro in range(largest, 0, -1):
        whole = fixed + size.activations(micro, seq_len, element, size.layers)
        if whole <= room:
            return Plan(micro, False, f"about {whole / 1e9:.3g} GB of the {free / 1e9:.3g} GB free")
    checkpointed = fixed + _checkpointed(size, 1, seq_len, element)
    if checkpointed <= room:
        return Plan(
            1, True, f"gradient checkpointing: about {checkpointed / 1e9:.3g} GB of the {free / 1e9:.3g} GB free"
        )
    raise TloraError(
        f"training needs about {checkpointed / 1e9:.3g} GB on {device} even one sample at a time with gradient "
        f"checkpointing ({size.num_params * element / 1e9:.3g} GB of weights), and {free / 1e9:.3g} GB is free: "
        f"{(checkpointed - room) / 1e9:.3g} GB short; free memory, use a larger device, or lower --seq-len"
    )


def _checkpointed(size: ModelSize, micro: int, seq_len: int, element: int) -> int:
    """Checkpointing keeps each layer's input and recomputes one layer at a time."""
    inputs = micro * seq_len * size.hidden * element * size.layers
    return inputs + size.activations(micro, seq_len, element, 1)
