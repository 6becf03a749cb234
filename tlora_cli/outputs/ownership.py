"""What `-o OUT` may be: never an input of the run, and under --overwrite only something tlora wrote.

tlora recognises its own outputs by their files: an adapter folder holds tlora_metadata.json,
adapter_config.json and adapter_model.safetensors (and may hold tlora's model card, README.md tagged
`tlora`, and its budget.png); a merged export holds config.json and tlora's model card; a calibration
folder holds calibration.json with format tlora-calibration/1; a plan is a JSON object whose "format"
is tlora-plan/1; a picture (`inspect --plot`) is any regular file, replaced only under --overwrite.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..adapter.layout import ADAPTER_FILES, CARD, OPTIONAL_FILES
from ..calib.layout import FORMAT as CALIBRATION_FORMAT
from ..calib.layout import MANIFEST as CALIBRATION_MANIFEST
from ..calib.layout import SUBFOLDERS as CALIBRATION_SUBFOLDERS
from ..errors import TloraError
from ..jsonio import maybe_object
from ..model.resolve import model_path
from ..plan import FORMAT as PLAN_FORMAT
from .card import is_tlora_card

# A trial folder (`tlora trial`): its result, its picture, and the winning start as an adapter folder.
TRIAL_RESULT, TRIAL_CURVES, TRIAL_BEST, TRIAL_FORMAT = "trial.json", "loss_curves.png", "best", "tlora-trial/1"
TRIAL_FILES = (TRIAL_RESULT, TRIAL_CURVES, TRIAL_BEST)
KINDS = {
    "adapter": "an adapter folder",
    "merged": "a merged checkpoint (tlora export --format merged)",
    "calibration": "a calibration folder",
    "plan": "a plan file",
    "trial": "a trial folder (tlora trial)",
    "picture": "a picture file (a regular file, not a folder or a link)",
}


def written_by_tlora(path: Path, kind: str) -> bool:
    """Whether `path` looks like a tlora output of this kind (by its files, never by its name)."""
    if path.is_symlink():
        return False
    if kind == "adapter":
        return path.is_dir() and all((path / name).is_file() for name in ADAPTER_FILES)
    if kind == "merged":
        return path.is_dir() and (path / "config.json").is_file() and is_tlora_card(path / CARD)
    if kind == "calibration":
        doc = maybe_object(path / CALIBRATION_MANIFEST) if path.is_dir() else None
        return doc is not None and doc.get("format") == CALIBRATION_FORMAT
    if kind == "plan":
        doc = maybe_object(path)
        return doc is not None and doc.get("format") == PLAN_FORMAT
    if kind == "trial":
        doc = maybe_object(path / TRIAL_RESULT) if path.is_dir() else None
        return doc is not None and doc.get("format") == TRIAL_FORMAT
    if kind == "picture":  # `inspect --plot FILE --overwrite`: a picture carries no mark of who drew it
        return path.is_file()
    raise ValueError(kind)


def foreign_entry(path: Path, kind: str) -> str | None:
    """The first file or folder in a tlora output folder that tlora does not write there (a README a
    trainer saved, a checkpoint): replacing the folder would delete it."""
    if kind in ("plan", "merged", "picture") or not path.is_dir():
        return None  # a merged checkpoint also carries the base's own files (tokenizer, generation config)
    if kind == "trial":
        for entry in sorted(path.iterdir()):
            if entry.name not in TRIAL_FILES or entry.is_symlink():
                return entry.name
        inner = foreign_entry(path / TRIAL_BEST, "adapter")
        return f"{TRIAL_BEST}/{inner}" if inner else None
    allowed = (
        {*ADAPTER_FILES, *OPTIONAL_FILES} - {CARD}
        if kind == "adapter"
        else {CALIBRATION_MANIFEST, *CALIBRATION_SUBFOLDERS}
    )
    for entry in sorted(path.iterdir()):
        if kind == "adapter" and entry.name == CARD and is_tlora_card(entry):
            continue
        if entry.name not in allowed or entry.is_symlink():
            return entry.name
        if entry.is_dir():
            for inner in sorted(entry.iterdir()):
                if inner.suffix != ".safetensors" or not inner.is_file() or inner.is_symlink():
                    return f"{entry.name}/{inner.name}"
    return None


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path.expanduser()))


def data_path(data: str | None) -> Path | None:
    """The local file or folder `--data` reads, if it names one (PATH or NAME=PATH)."""
    if not data:
        return None
    for candidate in (data, data.partition("=")[2]):
        if candidate and Path(candidate).expanduser().exists():
            return Path(candidate).expanduser()
    return None


def output_flag(kind: str) -> str:
    """The flag that names OUT, for messages: -o, or --plot for inspect's picture."""
    return "--plot" if kind == "picture" else "-o"


def check_output(out: Path, kind: str, overwrite: bool, inputs: Iterable[tuple[str, Path | None]] = ()) -> None:
    """Fail before any work when OUT is not a place tlora may write `kind` to.

    `inputs` are (flag, path) pairs: OUT may be none of them, contain none, and lie inside none.
    """
    named = output_flag(kind)
    if str(out) in ("", ".") or out.name in ("", ".", ".."):
        raise TloraError(f"{named} {str(out)!r} names no new {kind} path: give a name such as {named} my-{kind}")
    if out.is_symlink():
        raise TloraError(f"{named} {out} is a symbolic link: pass the path it points to, or another name")
    real_out = _real(out)
    for flag, path in inputs:
        if path is None:
            continue
        real_in = _real(path)
        if real_out == real_in:
            raise TloraError(f"{named} {out} is the {flag} input of this run: choose another {named}")
        if real_in.is_relative_to(real_out):
            raise TloraError(f"{named} {out} contains the {flag} input {path} of this run: choose another {named}")
        # Scratch space is no input to keep intact: OUT may lie inside --offload-dir.
        if real_out.is_relative_to(real_in) and real_in.is_dir() and flag != "--offload-dir":
            raise TloraError(f"{named} {out} lies inside the {flag} input {path} of this run: write it elsewhere")
    if (out.exists() or out.is_symlink()) and overwrite:
        if not written_by_tlora(out, kind):
            raise TloraError(
                f"{out} is not {KINDS[kind]} written by tlora: --overwrite replaces only tlora's own outputs; "
                f"move it away yourself or choose another {named}"
            )
        foreign = foreign_entry(out, kind)
        if foreign is not None:
            raise TloraError(
                f"{out} holds {foreign}, which tlora did not write there: --overwrite would delete it; "
                f"move it away yourself or choose another {named}"
            )


def run_inputs(
    model: str | None = None,
    data: str | None = None,
    calibration: Path | None = None,
    plan: Path | None = None,
    offload_dir: Path | None = None,
    *,
    builtin_model: bool = True,
) -> tuple[tuple[str, Path | None], ...]:
    """The (flag, path) pairs a run reads from, for check_output."""
    return (
        ("--model", model_path(model) if model is not None or builtin_model else None),
        ("--data", data_path(data)),
        ("--calibration", calibration),
        ("--plan", plan),
        ("--offload-dir", offload_dir),
    )
