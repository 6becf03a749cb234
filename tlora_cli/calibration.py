"""The calibration directory: statistics plus where they came from, so `init` can finish without the model."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .calib_check import check_files, check_manifest, check_tensor
from .errors import TloraError
from .statistics import Statistics
from .targets import Target

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


class TensorFiles(Mapping):
    """Per-module tensors read from disk one at a time, so a big model's never all sit in memory."""

    def __init__(self, folder: Path, keys: list[str], field: str):
        self.folder, self.keys_, self.field = folder, keys, field

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        path = self.folder / f"{key}.safetensors"
        try:
            with safe_open(path, "pt") as f:
                return check_tensor(f.get_tensor(self.field), path)
        except (OSError, RuntimeError, SafetensorError) as e:
            raise TloraError(f"cannot read {path}: {e}; recalibrate".splitlines()[0]) from e

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


class TensorSink:
    """Finished statistics leave the device at once: into host memory, or files in a folder."""

    def __init__(self, folder: Path | None, field: str):
        self.folder, self.field = folder, field
        self.memory: dict[str, torch.Tensor] = {}
        self.keys: list[str] = []
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self.keys.append(key)
        if self.folder is None:
            self.memory[key] = tensor.cpu()
        else:
            save_file({self.field: tensor.contiguous().cpu()}, self.folder / f"{key}.safetensors")

    def result(self) -> Mapping[str, torch.Tensor]:
        return self.memory if self.folder is None else TensorFiles(self.folder, self.keys, self.field)


def sink(folder: Path | None, kind: str) -> TensorSink:
    """Where one kind of statistic goes: `folder/<kind's subfolder>`, or memory without a folder."""
    subfolder, field = LAYOUT[kind]
    return TensorSink(folder / subfolder if folder else None, field)


def _save(tensors: Mapping[str, torch.Tensor], folder: Path, kind: str) -> None:
    subfolder, field = LAYOUT[kind]
    target = folder / subfolder
    if isinstance(tensors, TensorFiles) and tensors.folder == target:
        return  # the streaming engine wrote them straight into the folder
    target.mkdir(parents=True, exist_ok=True)
    for key, tensor in tensors.items():
        save_file({field: tensor.contiguous()}, target / f"{key}.safetensors")


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
        missing = [k for k in files or () if not (files.folder / f"{k}.safetensors").is_file()]
        if missing:
            raise TloraError(f"calibration {folder} lacks {files.folder.name}/{missing[0]}: recalibrate")
    check_files(folder, manifest)
    return calibration


def _files(folder: Path, kind: str, keys: list[str]) -> TensorFiles:
    subfolder, field = LAYOUT[kind]
    return TensorFiles(folder / subfolder, keys, field)
