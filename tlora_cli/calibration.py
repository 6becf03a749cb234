"""The calibration directory: statistics plus where they came from, so `init` can finish without the model."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import TloraError
from .statistics import Statistics
from .targets import Target

FORMAT = "tlora-calibration/1"
MANIFEST = "calibration.json"
COVARIANCE_DIR = "covariances"


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


class CovarianceFiles(Mapping):
    """Covariances read from disk one at a time, so a big model's never all sit in memory."""

    def __init__(self, folder: Path, keys: list[str]):
        self.folder = folder
        self.keys_ = keys

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        path = self.folder / f"{key}.safetensors"
        try:
            with safe_open(path, "pt") as f:
                return f.get_tensor("covariance")
        except (OSError, RuntimeError) as e:
            raise TloraError(f"cannot read covariance {path}: {e}; recalibrate".splitlines()[0]) from e

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def save_calibration(calibration: Calibration, folder: Path) -> None:
    stats = calibration.stats
    target = folder / COVARIANCE_DIR
    target.mkdir(parents=True, exist_ok=True)
    already_there = isinstance(stats.covariances, CovarianceFiles) and stats.covariances.folder == target
    if not already_there:  # the streaming engine writes them straight into the folder
        for key, cov in stats.covariances.items():
            save_file({"covariance": cov.contiguous()}, target / f"{key}.safetensors")
    manifest = {
        "format": FORMAT,
        "model": calibration.model,
        "data": calibration.data,
        "settings": calibration.settings,
        "num_samples": stats.num_samples,
        "num_tokens": stats.num_tokens,
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
        if manifest.get("format") != FORMAT:
            raise TloraError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}: recalibrate")
        modules = manifest["modules"]
        targets = [Target(m["name"], *m["shape"]) for m in modules]
        stats = Statistics(
            targets=targets,
            input_of={m["name"]: m["input"] for m in modules},
            covariances=CovarianceFiles(folder / COVARIANCE_DIR, sorted({m["input"] for m in modules})),
            scores={m["name"]: float(m["score"]) for m in modules},
            num_samples=int(manifest["num_samples"]),
            num_tokens=int(manifest["num_tokens"]),
        )
        calibration = Calibration(stats, manifest["model"], manifest["data"], manifest["settings"], manifest["timings"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TloraError(f"{path} is damaged ({type(e).__name__}: {e}): recalibrate".splitlines()[0]) from e
    missing = [k for k in stats.covariances if not (folder / COVARIANCE_DIR / f"{k}.safetensors").is_file()]
    if missing:
        raise TloraError(f"calibration {folder} lacks the covariance of {missing[0]}: recalibrate")
    return calibration
