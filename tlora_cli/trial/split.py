"""The samples a trial reads, carved once from --data: a held-out split scored and never trained on, and the pool
that calibration, the pre-launch and every fine-tune draw from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..data import CalibrationSet, DataOptions, EncodedSample, load_calibration_set
from ..errors import TloraError
from ..methods.prelaunch import cycled
from ..names import published


@dataclass
class Split:
    heldout: CalibrationSet
    pool: CalibrationSet
    duplicates_dropped: int  # pool samples equal to a held-out one, token for token

    def record(self) -> dict:
        return {
            "source": published(self.pool.source),
            "sha256": self.pool.sha256,
            "heldout": [w.replace(self.pool.source, published(self.pool.source)) for w in self.heldout.wheres],
            "pool": len(self.pool.samples),
            "duplicates_dropped": self.duplicates_dropped,
        }

    def batches(self, steps: int, batch: int, seed: int) -> list[list[EncodedSample]]:
        """The fine-tunes' batches: the pool in its seeded order, cycled; the same for every arm."""
        order = cycled(len(self.pool.samples), steps * batch, seed)
        return [[self.pool.samples[i] for i in order[k * batch : (k + 1) * batch]] for k in range(steps)]


def carve(data: DataOptions, tokenizer: Any, eval_samples: int, pool: int, seq_len: int, seed: int) -> Split:
    """The first `eval_samples` of the seeded shuffle are held out, the next `pool` form the pool."""
    chosen = load_calibration_set(data, tokenizer, eval_samples + pool, seq_len, seed)
    n = len(chosen.samples)
    if n <= eval_samples:
        raise TloraError(
            f"{chosen.source} has {n} samples: holding out --eval-samples {eval_samples} leaves none to train on; "
            "lower --eval-samples or give more data"
        )
    heldout = _part(chosen, range(eval_samples))
    seen = {tuple(s.input_ids) for s in heldout.samples}
    kept = [i for i in range(eval_samples, n) if tuple(chosen.samples[i].input_ids) not in seen]
    if not kept:
        raise TloraError(f"every sample of {chosen.source} outside the held-out split repeats one inside it")
    return Split(heldout, _part(chosen, kept), n - eval_samples - len(kept))


def _part(chosen: CalibrationSet, indices) -> CalibrationSet:
    indices = list(indices)
    return dataclasses.replace(
        chosen, samples=[chosen.samples[i] for i in indices], wheres=[chosen.wheres[i] for i in indices]
    )
