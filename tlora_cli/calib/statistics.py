"""What calibration produces (SPEC.md, "Statistics"), whichever engine ran the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..data import EncodedSample
from ..targets import Target
from .store import TensorStore


@dataclass
class Statistics:
    """What calibration measures; covariances are keyed by the first module that reads each input."""

    targets: list[Target]
    input_of: dict[str, str]
    covariances: Mapping[str, torch.Tensor]
    scores: dict[str, float]
    num_samples: int
    num_tokens: int
    # LoRA-DA only (docs/lora-da.md section 3): per module, the mean over samples of dL_n/dW, and
    # diag E[g g^T] of the gradients g reaching the module's output, averaged over tokens.
    mean_grads: Mapping[str, torch.Tensor] | None = None
    output_grad_sq: Mapping[str, torch.Tensor] | None = None


@dataclass
class StatisticStores:
    """Where finished statistics go as soon as a layer (or the whole model) is done: memory or files."""

    covariances: TensorStore
    mean_grads: TensorStore | None = None
    output_grad_sq: TensorStore | None = None

    def put(self, finished: Mapping[str, dict[str, torch.Tensor]]) -> None:
        """Move every finished tensor into its store, popping it so no name holds it into the next layer."""
        for kind, tensors in finished.items():
            store = getattr(self, kind)
            for key in list(tensors):
                store.put(key, tensors.pop(key))

    def statistics(
        self,
        targets: list[Target],
        input_of: dict[str, str],
        scores: dict[str, float],
        samples: Sequence[EncodedSample],
        covariances: Mapping[str, torch.Tensor] | None = None,
    ) -> Statistics:
        """The Statistics over what these stores hold (`covariances` replaces theirs when given)."""
        return Statistics(
            targets=targets,
            input_of=input_of,
            covariances=self.covariances if covariances is None else covariances,
            scores=scores,
            num_samples=len(samples),
            num_tokens=sum(len(s.input_ids) for s in samples),
            mean_grads=self.mean_grads,
            output_grad_sq=self.output_grad_sq,
        )
