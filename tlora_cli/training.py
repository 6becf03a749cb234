"""Loading a tlora adapter for training with PEFT, A frozen as TLoRA prescribes."""

from __future__ import annotations

from pathlib import Path

import torch

from .adapter.layout import METADATA
from .jsonio import maybe_object


def freeze_lora_a(model: torch.nn.Module) -> int:
    """Turn every lora_A weight into a buffer; returns how many.

    PEFT calls requires_grad_(True) on every LoRA layer on load and again on `set_adapter`; a buffer
    is untouched by that, never reaches an optimizer (so no weight decay drifts it), and is still
    saved, merged and moved with the model like the weight it replaces.
    """
    frozen = 0
    for name, module in model.named_modules():
        if ".lora_A." not in f".{name}." or not isinstance(module, torch.nn.Linear):
            continue
        weight = module._parameters.pop("weight", None)
        if weight is None:  # already a buffer
            continue
        module.register_buffer("weight", weight.detach())
        frozen += 1
    return frozen


def load_for_training(base_model: torch.nn.Module, adapter_dir: str | Path, freeze_a: bool | None = None):
    """`PeftModel.from_pretrained(..., is_trainable=True)` with A frozen as the adapter's recipe says.

    freeze_a=None follows `train_a` in tlora_metadata.json (`tlora init --train-a/--freeze-a`);
    without metadata, A is frozen.
    """
    from peft import PeftModel

    if freeze_a is None:
        freeze_a = not (maybe_object(Path(adapter_dir) / METADATA) or {}).get("train_a", False)
    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=True)
    if freeze_a:
        freeze_lora_a(model)
    return model
