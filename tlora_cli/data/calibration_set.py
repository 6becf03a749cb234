"""The calibration set: N samples picked by a seeded shuffle from what `--data` names, encoded per SPEC.md."""

from __future__ import annotations

from typing import Any

from ..errors import TloraError
from .encode import check_seq_len, encode_sample
from .options import DataOptions
from .samples import CalibrationSet
from .sources import choose_samples


def load_calibration_set(
    data: DataOptions | str | None, tokenizer: Any, num_samples: int, seq_len: int, seed: int
) -> CalibrationSet:
    """Pick `num_samples` samples by a seeded shuffle and encode them in that order.

    `data` is DataOptions, or just its `data` (a path, a dataset name, a hub id; None: the built-in set).
    Fewer available than asked is not an error: all are used and `num_available` tells the caller.
    """
    options = data if isinstance(data, DataOptions) else DataOptions(data)
    if num_samples < 1:
        raise TloraError(f"the number of calibration samples must be at least 1, got {num_samples}; ask for 1 or more")
    check_seq_len(seq_len)
    chosen = choose_samples(options, num_samples, seed)
    encoded = [
        encode_sample(sample, tokenizer, seq_len, where=where, chat_template=options.chat_template)
        for sample, where in zip(chosen.samples, chosen.wheres)
    ]
    return CalibrationSet(
        encoded,
        chosen.source,
        chosen.sha256,
        chosen.num_available,
        wheres=chosen.wheres,
        num_skipped=chosen.num_skipped,
        provenance=chosen.provenance | ({"chat_template": True} if options.chat_template else {}),
    )
