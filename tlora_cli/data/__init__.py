"""Calibration data: read samples from a file, a named or hub dataset (or the built-in set), pick N, tokenize
per SPEC.md. The names below are the package's interface; its modules never import from here."""

from __future__ import annotations

from .builtin import builtin_samples
from .calibration_set import load_calibration_set
from .encode import encode_sample
from .files import read_samples
from .options import DataOptions
from .registry import REGISTRY, list_datasets
from .samples import CalibrationSet, EncodedSample, Sample
from .show import ShownSample, datasets_plain, datasets_table, samples_plain, samples_text, show_samples

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
    "read_samples",
    "samples_plain",
    "samples_text",
    "show_samples",
]
