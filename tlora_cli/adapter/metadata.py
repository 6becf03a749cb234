"""What the tool records about a run beside the adapter (tlora_metadata.json), kept out of adapter_config.json."""

from __future__ import annotations

import contextlib
import datetime
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

from .. import __version__
from ..allocation import ModuleAllocation
from ..calib.folder import Calibration
from ..calib.statistics import COVARIANCES
from ..methods import InitSettings, covariance_kind
from ..names import published
from ..recipe import RELEASED_NUM_SAMPLES

PATH_FIELDS = ("source", "local_copy", "folder")  # data provenance that may hold a local path


def package_versions() -> dict[str, str]:
    versions = {"tlora": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "safetensors", "peft", "huggingface-hub", "datasets"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def metadata(
    calibration: Calibration,
    allocations: list[ModuleAllocation],
    allocation: dict,
    init: InitSettings,
    adapter_dtype: torch.dtype,
    timings: dict,
) -> dict:
    """Everything the tool knows about the run (SPEC.md)."""
    reads_covariance = COVARIANCES in init.method.statistics
    return {
        "tool": "tlora",
        "method": init.method.name,
        "train_a": init.trains_a,
        **init.recorded(),
        "recipe": init.recipe.recipe,
        **({"released_recipe": released_departures(calibration, allocations)} if init.recipe.released else {}),
        "covariance": covariance_kind(calibration.settings.get("center", False)) if reads_covariance else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {**calibration.model, "name": published(calibration.model["name"])},
        "data": published_data(calibration.data),
        "calibration": {
            **calibration.settings,
            "num_samples": calibration.stats.num_samples,
            "num_tokens": calibration.stats.num_tokens,
        },
        "allocation": allocation,
        "adapter_dtype": str(adapter_dtype).removeprefix("torch."),
        "modules": [a.as_dict() for a in allocations],
        "versions": package_versions(),
        "timings": timings,
    }


def published_data(data: dict) -> dict:
    """The data's provenance with every local path cut to its name."""
    return {k: published(v) if k in PATH_FIELDS and isinstance(v, str) else v for k, v in data.items()}


def released_departures(calibration: Calibration, allocations: list[ModuleAllocation]) -> dict:
    """What `--recipe released` changed from the default, and where this run still differs from the released code."""
    differs = ["covariance accumulated in float32 (the released code accumulates in bfloat16)"]
    if calibration.stats.num_samples != RELEASED_NUM_SAMPLES:
        differs.append(f"{calibration.stats.num_samples} samples (the released code uses {RELEASED_NUM_SAMPLES})")
    left_out = [a.name for a in allocations if not a.rank]
    if left_out:
        differs.append(f"{len(left_out)} modules with rank 0 left out (the released code builds rank-0 layers)")
    return {
        "changed_from_default": [
            "ranks: round(R p_i), the leftover to the module with the largest rank (default: largest remainder)",
            "scaling: max(alpha, round(alpha_total p_i)) / r_init (default: alpha_total p_i / r_init)",
            "A trained with B (default: A frozen)",
            f"{RELEASED_NUM_SAMPLES} samples unless --num-samples says otherwise (default: 32)",
        ],
        "differs_from_released": differs,
    }
