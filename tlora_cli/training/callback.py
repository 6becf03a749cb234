"""A frozen A in trainers that load the adapter themselves: a `transformers.TrainerCallback`, which HF's Trainer,
TRL and every trainer built on them (LLaMA-Factory's `run_exp(callbacks=...)`) take.

The Trainer builds its optimizer before `on_train_begin`, so A may already sit in a parameter group: its gradient is
set to None before every optimizer step, which AdamW (weight decay included) then skips, and A is checked unchanged
at the end. Loading with `load_for_training` instead keeps A out of the optimizer altogether.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..adapter.layout import METADATA
from ..jsonio import maybe_object

LOG = logging.getLogger(__name__)


def lora_a_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every lora_A weight of a PEFT model that is still a parameter (`freeze_lora_a` makes them buffers)."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n}


class KeepLoraAFrozen(TrainerCallback):
    """Keeps every lora_A as it was loaded, when the adapter's recipe freezes A (`adapter_dir`'s tlora_metadata.json
    says `train_a: false`; without `adapter_dir`, always)."""

    def __init__(self, adapter_dir: str | Path | None = None):
        meta = maybe_object(Path(adapter_dir) / METADATA) if adapter_dir is not None else None
        self.active = not (meta or {}).get("train_a", False)
        self.frozen: dict[str, torch.nn.Parameter] = {}
        self.start: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.active or model is None:
            return
        self.frozen = lora_a_parameters(model)
        for p in self.frozen.values():
            p.requires_grad_(False)
        self.start = {n: p.detach().clone() for n, p in self.frozen.items()}
        LOG.info("tlora: %d lora_A weights kept frozen", len(self.frozen))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for p in self.frozen.values():
            p.grad = None  # a torch optimizer skips a parameter without a gradient, weight decay included

    def on_train_end(self, args, state, control, **kwargs):
        moved = [n for n, p in self.frozen.items() if not torch.equal(p.detach(), self.start[n])]
        if moved:
            LOG.warning(
                "tlora: %d lora_A weights changed in training (%s, ...): this optimizer updates parameters without a "
                "gradient; load the adapter with tlora_cli.training.load_for_training instead",
                len(moved),
                moved[0],
            )
