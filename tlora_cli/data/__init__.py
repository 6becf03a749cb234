"""Calibration data: read samples from a file, a named or hub dataset (or the built-in set), pick N, tokenize
per SPEC.md."""

from __future__ import annotations

from typing import Any

from ..errors import TloraError
from .builtin import builtin_samples
from .encode import check_seq_len, encode_sample
from .files import read_samples
from .registry import REGISTRY, list_datasets
from .samples import CalibrationSet, EncodedSample, Sample
from .show import ShownSample, datasets_plain, datasets_table, samples_plain, samples_text, show_samples
from .sources import DataOptions, choose_samples

__all__ = [
    "REGISTRY",
    "CalibrationSet",
    "DataOptions",
    "EncodedSample",
    "Sample",
    "ShownSample",
    "builtin_samples",
    "datasets_plain",
    "datasets_table",
    "encode_sample",
    "list_datasets",
    "load_calibration_set",
    "rank_warning",
    "read_samples",
    "samples_plain",
    "samples_text",
    "show_samples",
]


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


def rank_warning(num_tokens: int, largest_rank: int) -> str | None:
    """The warning to print when the calibration has fewer tokens than the largest rank asked for: the
    covariance X^T X then has at most `num_tokens` directions, and the rest of A's rows span nothing the data
    showed. None when there is no shortfall."""
    if num_tokens >= largest_rank:
        return None
    return (
        f"the calibration has {num_tokens} tokens but a module gets rank {largest_rank}: its covariance has "
        "fewer directions than A needs; use more or longer samples"
    )
