"""What calibration produces (SPEC.md, "Statistics"), whichever engine ran the model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..data import EncodedSample
from ..model.targets import Target
from .store import TensorStore


@dataclass(frozen=True)
class Kind:
    """A tensor statistic: its subfolder and tensor name in a calibration folder, what keys it, its shape, and
    for a gradient statistic how a batch adds to its sum and what the sum is divided by."""

    folder: str
    field: str
    per_input: bool  # keyed by the input (modules reading one input share it), else by module
    shape: Callable[[int, int], tuple[int, ...]]  # of one key's tensor, from the module's (out, in)
    # (output gradients (tokens x out), inputs (tokens x in)), both float32 -> what this batch adds to the sum
    from_gradient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    per: str = "tokens"  # the sum becomes a mean over "tokens" or over "samples"

    @property
    def weight_sized(self) -> bool:
        """One tensor as large as each module's weight (for the memory estimate)."""
        return not self.per_input and len(self.shape(2, 3)) == 2


COVARIANCES = "covariances"
# Every tensor statistic calibration can produce. A new one is a row here (with its `from_gradient`, or a hook in
# the collector for an input statistic) and a method that asks for it; stores, the calibration folder and its
# checks follow from this table.
KINDS: dict[str, Kind] = {
    COVARIANCES: Kind("covariances", "covariance", True, lambda out, inp: (inp, inp)),
    # LoRA-DA only (docs/lora-da.md section 3): per module, the mean over samples of dL_n/dW, and
    # diag E[g g^T] of the gradients g reaching the module's output, averaged over tokens.
    "mean_grads": Kind(
        "mean_gradients", "mean_grad", False, lambda out, inp: (out, inp), lambda g, x: g.T @ x, per="samples"
    ),
    "output_grad_sq": Kind(
        "output_gradient_moments", "output_grad_sq", False, lambda out, inp: (out,), lambda g, x: g.pow(2).sum(dim=0)
    ),
}


def check_kinds(kinds: Iterable[str]) -> frozenset[str]:
    """A set of statistic names, each one KINDS knows."""
    kinds = frozenset(kinds)
    unknown = sorted(kinds - KINDS.keys())
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; known: {sorted(KINDS)}")
    return kinds


@dataclass
class Statistics:
    """What calibration measures: scores per module and `tensors` by kind (KINDS), each a mapping by key."""

    targets: list[Target]
    input_of: dict[str, str]
    tensors: dict[str, Mapping[str, torch.Tensor]]
    scores: dict[str, float]
    num_samples: int
    num_tokens: int
    owners: dict[str, int] | None = None  # under torchrun: the rank holding each input's tensors (init only)

    @property
    def covariances(self) -> Mapping[str, torch.Tensor]:
        """Keyed by the first module that reads each input."""
        return self.tensors[COVARIANCES]

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self.tensors)

    def rank_warning(self, largest_rank: int) -> str | None:
        """The warning to print when the calibration has fewer tokens than the largest rank asked for: the
        covariance X^T X then has at most `num_tokens` directions, and the rest of A's rows span nothing the
        data showed. None when there is no shortfall."""
        if self.num_tokens >= largest_rank:
            return None
        return (
            f"the calibration has {self.num_tokens} tokens but a module gets rank {largest_rank}: its covariance "
            "has fewer directions than A needs; use more or longer samples"
        )


class StatisticStores(dict[str, TensorStore]):
    """Where finished statistics go, by kind, as soon as a layer (or the whole model) is done: memory or files."""

    def __enter__(self) -> StatisticStores:
        return self

    def __exit__(self, kind: type | None, *_) -> None:
        """Every store's files written (or, after an error, no more begun) before the folder is used or removed;
        a store's failed write stops the others' too, and is raised once all are closed."""
        error: Exception | None = None
        for store in self.values():
            try:
                store.close(failed=kind is not None or error is not None)
            except Exception as e:
                error = error or e
        if error is not None:
            raise error

    def flush(self) -> None:
        for store in self.values():
            store.flush()

    def put(self, finished: Mapping[str, dict[str, torch.Tensor]]) -> None:
        """Move every finished tensor into its store, popping it so no name holds it into the next layer."""
        for kind, tensors in finished.items():
            for key in list(tensors):
                self[kind].put(key, tensors.pop(key))

    def statistics(
        self,
        targets: list[Target],
        input_of: dict[str, str],
        scores: dict[str, float],
        samples: Sequence[EncodedSample],
        covariances: Mapping[str, torch.Tensor] | None = None,
    ) -> Statistics:
        """The Statistics over what these stores hold, every file written (`covariances` replaces theirs when
        given)."""
        self.flush()
        tensors: dict[str, Mapping[str, torch.Tensor]] = dict(self)
        if covariances is not None:
            tensors[COVARIANCES] = covariances
        return Statistics(
            targets=targets,
            input_of=input_of,
            tensors=tensors,
            scores=scores,
            num_samples=len(samples),
            num_tokens=sum(len(s.input_ids) for s in samples),
        )
