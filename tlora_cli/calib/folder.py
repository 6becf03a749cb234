"""The calibration directory: statistics plus where they came from, so `init` can finish without the model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TloraError
from ..model.targets import Target
from .check import check_covariance, check_files, check_manifest, check_tensor, manifest_kinds
from .layout import FORMAT, MANIFEST
from .statistics import COVARIANCES, KINDS, Statistics, StatisticStores
from .store import TensorStore, write_tensors


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


def statistic_stores(folder: Path | None, kinds: frozenset[str]) -> StatisticStores:
    """Stores that write each finished statistic straight into the calibration folder's layout (or memory)."""
    return StatisticStores(
        {k: TensorStore(folder / KINDS[k].folder if folder else None, KINDS[k].field) for k in sorted(kinds)}
    )


def save_calibration(calibration: Calibration, folder: Path) -> None:
    stats = calibration.stats
    for kind, tensors in stats.tensors.items():
        write_tensors(tensors, folder / KINDS[kind].folder, KINDS[kind].field)
    manifest = {
        "format": FORMAT,
        "model": calibration.model,
        "data": calibration.data,
        "settings": calibration.settings,
        "num_samples": stats.num_samples,
        "num_tokens": stats.num_tokens,
        "statistics": sorted(stats.kinds),
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
        modules = manifest["modules"]
        targets = [Target(m["name"], *m["shape"]) for m in modules]
        keys = {True: sorted({m["input"] for m in modules}), False: [m["name"] for m in modules]}
        stats = Statistics(
            targets=targets,
            input_of={m["name"]: m["input"] for m in modules},
            tensors={
                kind: _files(folder, kind, keys[KINDS[kind].per_input]) for kind in manifest_kinds(manifest, path)
            },
            scores={m["name"]: float(m["score"]) for m in modules},
            num_samples=int(manifest["num_samples"]),
            num_tokens=int(manifest["num_tokens"]),
        )
        calibration = Calibration(stats, manifest["model"], manifest["data"], manifest["settings"], manifest["timings"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as e:
        raise TloraError(f"{path} is damaged ({type(e).__name__}: {e}): recalibrate".splitlines()[0]) from e
    for files in stats.tensors.values():
        missing = files.missing()
        if missing:
            raise TloraError(f"calibration {folder} lacks {files.folder.name}/{missing[0]}: recalibrate")
    check_files(folder, manifest)
    return calibration


def _files(folder: Path, kind: str, keys: list[str]) -> TensorStore:
    """Tensors of one kind read from disk one at a time, so a big model's never all sit in memory."""
    check = check_covariance if kind == COVARIANCES else check_tensor
    return TensorStore(folder / KINDS[kind].folder, KINDS[kind].field, keys, check=check)
