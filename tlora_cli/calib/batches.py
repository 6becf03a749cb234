"""Samples run B at a time: padded on the right, and a loss whose gradient for each sample is its own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import EncodedSample
from ..errors import TloraError


@dataclass
class Batch:
    """Samples padded on the right to the longest: pads are token 0, label -100 and False in `mask`.

    Right padding leaves every real token's activations as in a batch of one (causal attention never looks
    ahead), so the pads only need keeping out of the covariances.
    """

    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) bool, True on real tokens
    first: int  # the index of its first sample, for messages
    padded: bool  # whether any sample has pads: known before the batch goes to the device, so never a sync

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """For the model; None when nothing is padded, so a batch without pads runs as it always did."""
        return self.mask.long() if self.padded else None

    @property
    def pads(self) -> torch.Tensor | None:
        """`mask` where some token is a pad, else None: what the statistics need to leave pads out."""
        return self.mask if self.padded else None

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def make_batches(samples: Sequence[EncodedSample], size: int, device: torch.device | str) -> list[Batch]:
    """Consecutive samples in batches of `size` (the last may be smaller), on `device`."""
    batches = []
    for first in range(0, len(samples), size):
        group = samples[first : first + size]
        length = max(len(s.input_ids) for s in group)
        ids = torch.zeros(len(group), length, dtype=torch.long)
        labels = torch.full((len(group), length), -100, dtype=torch.long)
        mask = torch.zeros(len(group), length, dtype=torch.bool)
        for row, s in enumerate(group):
            n = len(s.input_ids)
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(s.input_ids), torch.tensor(s.labels), True
        padded = not bool(mask.all())
        batches.append(Batch(ids.to(device), labels.to(device), mask.to(device), first, padded))
    return batches


def batch_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The sum over samples of each sample's mean next-token cross-entropy over its loss tokens: a sample's
    gradient is then exactly the one it has in a batch of one.

    The labels shift left rather than the logits right: a slice of the logits would cost a copy forward and
    a zero-filled gradient of the whole vocabulary backward."""
    targets = F.pad(batch.labels[:, 1:], (0, 1), value=-100)
    counts = (targets != -100).sum(dim=1)
    empty = (counts == 0).nonzero()
    if len(empty):
        index = batch.first + int(empty[0, 0])
        raise TloraError(f"calibration sample {index} has no token to predict: it needs at least 2 tokens")
    flat = logits.float().reshape(-1, logits.shape[-1])
    losses = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="none").view(targets.shape)
    return (losses.sum(dim=1) / counts).sum()
