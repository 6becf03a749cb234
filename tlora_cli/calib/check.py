"""A calibration folder checked against itself and against the model before anything is computed from it.

A hand-edited or damaged folder must end in one line, never in an adapter PEFT cannot load, a plan with
negative ranks, or a read outside the folder.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import TloraError
from .layout import FORMAT, MANIFEST
from .statistics import COVARIANCES, KINDS

# What "gradients": true meant in a calibration folder of tlora 0.1/0.2.
LEGACY_GRADIENT_KINDS = ("mean_grads", "output_grad_sq")

# What a module name can hold (dots between parts); anything else could make a path leave the folder.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def _damaged(path: Path, why: str) -> TloraError:
    return TloraError(f"{path} is damaged: {why}: recalibrate with `tlora calibrate`")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_manifest(manifest: object, path: Path) -> None:
    """The manifest's own structure: types, names that stay in the folder, positive shapes, finite scores."""
    if not isinstance(manifest, dict):
        raise _damaged(path, "it is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise TloraError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}: recalibrate")
    for key, kind in (("model", dict), ("data", dict), ("settings", dict), ("modules", list)):
        if not isinstance(manifest.get(key), kind):
            raise _damaged(path, f'"{key}" is missing or not a {"list" if kind is list else "JSON object"}')
    if not isinstance(manifest.get("timings", {}), dict):
        raise _damaged(path, '"timings" is not a JSON object')
    model = manifest["model"]
    for key in ("name", "fingerprint"):
        if not isinstance(model.get(key), str) or not model[key]:
            raise _damaged(path, f'the model has no "{key}"')
    for key in ("num_samples", "num_tokens"):
        if not _is_int(manifest.get(key)) or manifest[key] < 1:
            raise _damaged(path, f'"{key}" is {manifest.get(key)!r}, not a positive integer')
    modules = manifest["modules"]
    if not modules:
        raise _damaged(path, "it lists no modules")
    names: set[str] = set()
    for m in modules:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise _damaged(path, "a module entry has no name")
        name = m["name"]
        if not _NAME.fullmatch(name) or ".." in name:
            raise _damaged(path, f"module name {name!r} is not a module name")
        if name in names:
            raise _damaged(path, f"module {name} is listed twice")
        names.add(name)
        shape = m.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and s > 0 for s in shape)):
            raise _damaged(path, f"module {name} has shape {shape!r}, not two positive integers")
        score = m.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) or score < 0:
            raise _damaged(path, f"module {name} has score {score!r}, not a finite number >= 0")
    for m in modules:
        key = m.get("input")
        if not isinstance(key, str) or key not in names:
            raise _damaged(path, f"module {m['name']} reads input {key!r}, which is not one of its modules")
        first = next(x for x in modules if x["name"] == key)
        if first["shape"][1] != m["shape"][1]:
            raise _damaged(path, f"modules {key} and {m['name']} share an input but not its width")


def manifest_kinds(manifest: dict, path: Path) -> frozenset[str]:
    """The statistics a calibration folder holds: as it lists them, or for a folder of tlora 0.1/0.2 (which says
    only whether it holds LoRA-DA's gradient statistics) the covariances and, if it says so, those."""
    if "statistics" not in manifest:
        return frozenset({COVARIANCES, *(LEGACY_GRADIENT_KINDS if manifest.get("gradients") else ())})
    listed = manifest["statistics"]
    if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
        raise _damaged(path, '"statistics" is not a list of names')
    unknown = sorted(set(listed) - KINDS.keys())
    if unknown:
        raise _damaged(path, f"it lists statistic {unknown[0]!r}, which this tlora does not know")
    return frozenset(listed)


def check_files(folder: Path, manifest: dict) -> None:
    """Every tensor file the manifest needs: inside the folder, the right tensor, the right shape."""
    modules = manifest["modules"]
    root = folder.resolve()
    for kind in manifest_kinds(manifest, folder / MANIFEST):
        subfolder, field = KINDS[kind].folder, KINDS[kind].field
        wanted = {m["input"] if KINDS[kind].per_input else m["name"]: KINDS[kind].shape(*m["shape"]) for m in modules}
        for key, shape in wanted.items():
            path = folder / subfolder / f"{key}.safetensors"
            if not path.resolve().is_relative_to(root):
                raise _damaged(folder / MANIFEST, f"{subfolder}/{key} leads outside the folder")
            if not path.is_file():
                raise TloraError(f"calibration {folder} lacks {subfolder}/{key}: recalibrate")
            try:
                with safe_open(path, "pt") as f:
                    if field not in f.keys():  # noqa: SIM118
                        raise _damaged(path, f"it holds no tensor {field!r}")
                    got = tuple(f.get_slice(field).get_shape())
            except (SafetensorError, OSError, RuntimeError) as e:
                raise _damaged(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from e
            if got != shape:
                raise _damaged(path, f"{field} has shape {list(got)}, the manifest needs {list(shape)}")


def check_tensor(tensor: torch.Tensor, path: Path) -> torch.Tensor:
    """A statistic read from a calibration folder: finite, or one line."""
    if not tensor.is_floating_point():
        raise _damaged(path, f"it holds {str(tensor.dtype).removeprefix('torch.')} values, not floating point")
    if not bool(torch.isfinite(tensor).all()):
        raise _damaged(path, "it holds NaN or inf values")
    return tensor


# What float32 sums of x x^T leave of a covariance's symmetry and semi-definiteness: asymmetry relative to the
# largest entry, and the smallest eigenvalue below 0 relative to the largest (docs/reliability.md).
SYMMETRY_TOLERANCE = 1e-5
NEGATIVE_TOLERANCE = 1e-4


def check_covariance(tensor: torch.Tensor, path: Path) -> torch.Tensor:
    """A covariance read from a calibration folder (once per input): finite, symmetric and positive
    semi-definite to float32 rounding, or one line naming the input; any other matrix gives A from nonsense."""
    check_tensor(tensor, path)
    name = f"the covariance of {path.stem}"
    largest = max(tensor.max().item(), -tensor.min().item())  # no copy the size of C
    block = 1024  # C - C^T a block of rows at a time: no second matrix the size of C
    asymmetry = max(
        ((tensor[i : i + block] - tensor[:, i : i + block].T).abs().max().item() for i in range(0, len(tensor), block)),
        default=0.0,
    )
    if asymmetry > SYMMETRY_TOLERANCE * largest:
        raise _damaged(path, f"{name} is not symmetric (entries differ by {asymmetry / largest:.2g} of the largest)")
    if largest and not _semi_definite(tensor):
        raise _damaged(
            path, f"{name} is not positive semi-definite (an eigenvalue below -{NEGATIVE_TOLERANCE:g} of the largest)"
        )
    return tensor


def _semi_definite(covariance: torch.Tensor) -> bool:
    """Whether the smallest eigenvalue is at least -NEGATIVE_TOLERANCE times the largest: C shifted by that much
    has a float64 Cholesky factor (a third of an eigvalsh's work), computed in place of the copy."""
    c = covariance.double()
    vector = torch.ones(len(c), dtype=c.dtype) / len(c) ** 0.5
    for _ in range(30):  # power iteration: the largest eigenvalue's size, to a few percent
        product = c @ vector
        vector = product / product.norm().clamp_min(1e-300)
    top = max(product.norm().item(), c.diagonal().max().item())  # a PSD matrix's largest diagonal entry is below it
    c.diagonal().add_(NEGATIVE_TOLERANCE * top)
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(c, out=(c, info))
    return int(info) == 0


def check_against_model(calibration, checkpoint, where: str) -> None:
    """The calibration's modules exist in --model's checkpoint with the shapes it recorded."""
    for t in calibration.stats.targets:
        key = f"{t.name}.weight"
        if key not in checkpoint.files:
            raise TloraError(f"{where} names module {t.name}, which --model does not have: recalibrate")
        try:
            with safe_open(checkpoint.files[key], "pt") as f:
                shape = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError, RuntimeError) as e:
            raise TloraError(f"cannot read {key} from {checkpoint.files[key]}: {e}".splitlines()[0]) from e
        if shape != tuple(t.shape):
            raise TloraError(
                f"{where} records {t.name} as {list(t.shape)}, but --model's weight is {list(shape)}: recalibrate"
            )
