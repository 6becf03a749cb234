"""The calibration directory: statistics plus where they came from, so `init` can finish without the model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calib_check import check_files, check_manifest, check_tensor
from ..errors import TloraError
from ..targets import Target
from .statistics import Statistics, StatisticStores
from .store import TensorStore, write_tensors

FORMAT = "tlora-calibration/1"
MANIFEST = "calibration.json"
# kind -> (subfolder, tensor name in each file)
LAYOUT = {
    "covariance": ("covariances", "covariance"),
    "mean_grad": ("mean_gradients", "mean_grad"),
    "output_grad_sq": ("output_gradient_moments", "output_grad_sq"),
}


@dataclass
class Calibration:
    """Statistics and provenance: model (name, fingerprint), data (source, hash, counts), settings."""

    stats: Statistics
    model: dict
    data: dict
    settings: dict
    timings: dict = field(default_factory=dict)

    def check_model(self, fingerprint: str, where: str) -> None:
        if self.model["fingerprint"] != fingerprint:
            raise TloraError(
                f"{where} was made from a different model ({self.model['name']}, fingerprint "
                f"{self.model['fingerprint'][:12]}) than --model (fingerprint {fingerprint[:12]}): "
                "recalibrate with this model"
            )


def statistic_stores(folder: Path | None, gradients: bool) -> StatisticStores:
    """Stores that write each finished statistic straight into the calibration folder's layout (or memory)."""

    def store(kind: str) -> TensorStore:
        subfolder, field = LAYOUT[kind]
        return TensorStore(folder / subfolder if folder else None, field)

    if not gradients:
        return StatisticStores(store("covariance"))
    return StatisticStores(store("covariance"), store("mean_grad"), store("output_grad_sq"))


def _save(tensors: Mapping[str, torch.Tensor], folder: Path, kind: str) -> None:
    subfolder, field = LAYOUT[kind]
    write_tensors(tensors, folder / subfolder, field)


def save_calibration(calibration: Calibration, folder: Path) -> None:
    stats = calibration.stats
    _save(stats.covariances, folder, "covariance")
    if stats.mean_grads is not None:
        _save(stats.mean_grads, folder, "mean_grad")
        _save(stats.output_grad_sq, folder, "output_grad_sq")
    manifest = {
        "format": FORMAT,
        "model": calibration.model,
        "data": calibration.data,
        "settings": calibration.settings,
        "num_samples": stats.num_samples,
        "num_tokens": stats.num_tokens,
        "gradients": stats.mean_grads is not None,
        "modules": [
            {"name": t.name, "shape": list(t.shape), "input": stats.input_of[t.name], "score": stats.scores[t.name]}
            for t in stats.targets
        ],
        "timings": calibration.timings,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load_calibration(folder: Path) -> Calibration:
    path = folder / MANIFEST
    if not path.is_file():
        raise TloraError(f"{folder} is not a calibration directory (no {MANIFEST}): make one with `tlora calibrate`")
    try:
        manifest = json.loads(path.read_text())
        check_manifest(manifest, path)
        if manifest.get("format") != FORMAT:
            raise TloraError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}: recalibrate")
        modules = manifest["modules"]
        targets = [Target(m["name"], *m["shape"]) for m in modules]
        stats = Statistics(
            targets=targets,
            input_of={m["name"]: m["input"] for m in modules},
            covariances=_files(folder, "covariance", sorted({m["input"] for m in modules})),
            scores={m["name"]: float(m["score"]) for m in modules},
            num_samples=int(manifest["num_samples"]),
            num_tokens=int(manifest["num_tokens"]),
        )
        if manifest.get("gradients"):
            names = [m["name"] for m in modules]
            stats.mean_grads = _files(folder, "mean_grad", names)
            stats.output_grad_sq = _files(folder, "output_grad_sq", names)
        calibration = Calibration(stats, manifest["model"], manifest["data"], manifest["settings"], manifest["timings"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as e:
        raise TloraError(f"{path} is damaged ({type(e).__name__}: {e}): recalibrate".splitlines()[0]) from e
    for files in (stats.covariances, stats.mean_grads, stats.output_grad_sq):
        missing = files.missing() if files is not None else []
        if missing:
            raise TloraError(f"calibration {folder} lacks {files.folder.name}/{missing[0]}: recalibrate")
    check_files(folder, manifest)
    return calibration


def _files(folder: Path, kind: str, keys: list[str]) -> TensorStore:
    """Tensors of one kind read from disk one at a time, so a big model's never all sit in memory."""
    subfolder, field = LAYOUT[kind]
    return TensorStore(folder / subfolder, field, keys, check=check_tensor)
