"""Calibration data: read samples from a file (or the built-in set), pick N, tokenize per SPEC.md."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ..errors import TloraError
from .builtin import builtin_samples
from .encode import check_seq_len, encode_sample
from .files import FORMATS_HELP, read_file, read_samples
from .samples import CalibrationSet, EncodedSample, Sample

__all__ = [
    "CalibrationSet",
    "EncodedSample",
    "Sample",
    "builtin_samples",
    "encode_sample",
    "load_calibration_set",
    "read_samples",
]


def load_calibration_set(data: str | None, tokenizer: Any, num_samples: int, seq_len: int, seed: int) -> CalibrationSet:
    """Pick `num_samples` samples by a seeded shuffle and encode them in that order.

    Fewer available than asked is not an error: all are used and `num_available` tells the caller.
    """
    if num_samples < 1:
        raise TloraError(f"the number of calibration samples must be at least 1, got {num_samples}; ask for 1 or more")
    check_seq_len(seq_len)
    if data is None:
        samples, source, sha256 = builtin_samples()
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise TloraError(
                f"no data file '{data}' (and hub dataset names are not supported yet): pass a local "
                f"{FORMATS_HELP} file, or leave --data out to use the built-in math set"
            )
        samples, sha256 = read_file(path)
        source = data
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    encoded = [
        encode_sample(samples[i], tokenizer, seq_len, where=f"{source}: sample {i + 1}") for i in order[:num_samples]
    ]
    return CalibrationSet(encoded, source, sha256, num_available=len(samples))
