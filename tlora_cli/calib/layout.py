"""A calibration folder's names: its manifest, its format string, a subfolder per statistic (KINDS)."""

from __future__ import annotations

from .statistics import KINDS

FORMAT = "tlora-calibration/1"
MANIFEST = "calibration.json"
SUBFOLDERS = tuple(kind.folder for kind in KINDS.values())
