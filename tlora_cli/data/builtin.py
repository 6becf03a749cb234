"""The calibration set that ships with the package, used when the user gives no --data."""

from __future__ import annotations

import hashlib
from importlib import resources

from .files import parse_samples
from .samples import Sample

BUILTIN_SOURCE = "builtin:math-word-problems"
BUILTIN_FILE = "math_word_problems.jsonl.gz"


def builtin_samples() -> tuple[list[Sample], str, str]:
    """(samples, source, sha256): 400 GSM8K-style problems from benchmarks/math_problems.py, seed 0.

    Math word problems, because a worked solution is the kind of task the default model is tuned for.
    """
    raw = resources.files(__package__).joinpath(BUILTIN_FILE).read_bytes()
    return parse_samples(raw, BUILTIN_FILE), BUILTIN_SOURCE, hashlib.sha256(raw).hexdigest()
