"""The training loop: each step one batch of samples (split into micro-batches, and over torchrun's ranks), the loss
averaged over the batch's loss-carrying tokens, AdamW on the LoRA weights with a warmed-up rate."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..calib.batches import Batch, make_batches
from ..data import EncodedSample
from ..distributed import Dist
from ..errors import TloraError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Schedule:
    """`steps` optimizer steps at rate `lr`: linear warm-up over the first `warmup` (step k at (k + 1) / warmup of
    the rate, so none runs at 0), then constant, or with `decay` falling linearly towards 0 at the last step."""

    steps: int
    lr: float
    warmup: int
    decay: bool = False

    def rate(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if not self.decay:
            return self.lr
        return self.lr * (self.steps - step) / max(1, self.steps - self.warmup)


@dataclass(frozen=True)
class Plan:
    """How a step's batch runs: `micro_batch` samples at a time (gradients accumulated), with or without
    gradient checkpointing; `reason` says why, for the message and the metadata."""

    micro_batch: int
    checkpointing: bool
    reason: str


def loss_tokens(sample: EncodedSample) -> int:
    """Positions whose next token carries the loss (the model's one-token shift applied)."""
    return sum(label != IGNORE_INDEX for label in sample.labels[1:])


def token_loss_sum(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The sum of the next-token cross-entropy over every loss-carrying token of the batch (float32). The labels
    shift left rather than the logits right, which would copy the whole vocabulary's logits."""
    targets = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


@contextlib.contextmanager
def checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient checkpointing for the block (transformers' own, which acts in training mode only; every dropout
    stays in eval mode, so the forward is the one the model computes without it)."""
    if not enabled:
        yield
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    try:
        yield
    finally:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.eval()


def train(
    model: torch.nn.Module,
    parameters: Sequence[torch.Tensor],
    steps: Sequence[Sequence[EncodedSample]],
    schedule: Schedule,
    plan: Plan,
    dist: Dist | None = None,
    on_step: Callable[[float], None] | None = None,
    clip: float | None = None,
) -> list[float]:
    """Train `parameters` (leaf tensors the model's hooks read) for one step per batch in `steps`; returns the loss
    of each step (the mean over its loss-carrying tokens, before the update). `clip`: the gradients' largest norm."""
    dist = dist or Dist()
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(parameters, lr=schedule.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for p in parameters:  # every rank reduces every gradient, also one whose share of a batch is empty
        p.grad = torch.zeros_like(p)
    losses = []
    with checkpointing(model, plan.checkpointing):
        for k, batch in enumerate(steps):
            total = sum(loss_tokens(s) for s in batch)
            if total == 0:
                raise TloraError(f"training step {k + 1} has no token to predict: its samples need at least 2 tokens")
            mine = [batch[i] for i in dist.share(len(batch))]
            summed = torch.zeros((), dtype=torch.float64, device=device)
            for micro in make_batches(mine, plan.micro_batch, device):
                logits = model(input_ids=micro.input_ids, attention_mask=micro.attention_mask, use_cache=False).logits
                loss = token_loss_sum(logits, micro)
                (loss / total).backward()
                summed += loss.detach().double()
            dist.reduce_sum([(summed, None), *((p.grad, None) for p in parameters)])
            loss = summed.item() / total
            if not math.isfinite(loss):
                raise TloraError(f"the training loss became {loss} at step {k + 1}: lower the learning rate")
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(parameters, clip)
            for group in optimizer.param_groups:
                group["lr"] = schedule.rate(k)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            losses.append(loss)
            if on_step:
                on_step(loss)
    return losses


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, samples: Sequence[EncodedSample], batch_size: int = 8) -> float:
    """The mean next-token cross-entropy over every loss-carrying token of `samples` (token-weighted)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in make_batches(list(samples), batch_size, device):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        total += token_loss_sum(logits, batch).item()
        count += sum(loss_tokens(s) for s in samples[batch.first : batch.first + len(batch)])
    return total / count
