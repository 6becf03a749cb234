"""Outputs appear whole or not at all: written into a temp folder beside OUT, renamed at the end.

An existing OUT is replaced only under --overwrite and only when tlora wrote it (ownership.py); the new
one is swapped into place before the old one is removed, and an interrupt during the swap waits for it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import TloraError
from ..options import REQUIRED, Options, option, output_name
from ..signals import signals_deferred, terminate_as_interrupt
from .ownership import check_output


@dataclass
class OutputOptions(Options):
    """Where a command writes, and whether it may replace what is there (only tlora's own outputs)."""

    out: Path = option(REQUIRED, "Where to write.", "--out", "-o")
    overwrite: bool = option(False, "Replace OUT if it exists (only an output tlora wrote).", "--overwrite")


# Outputs put in place by this process: an interrupt after that must not say "nothing was written".
COMMITTED: list[Path] = []


def check_target(out: Path, overwrite: bool, kind: str = "adapter", inputs: tuple = ()) -> None:
    """Fail before any work when OUT exists (and no --overwrite), is not tlora's to replace, is an input
    of the run (`inputs`: (flag, path) pairs), or its folder is not writable."""
    problem = output_name(_absolute(out), room=14)  # the temporary name: ".OUT.tmp-" and 8 random characters
    if problem:
        raise TloraError(f"cannot write {out}: {problem}")
    check_output(out, kind, overwrite, inputs)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise TloraError(f"{out} already exists: pass --overwrite to replace it, or choose another -o")
    parent = _absolute(out).parent
    if parent.exists() and not parent.is_dir():
        raise TloraError(f"cannot write {out}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise TloraError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TloraError(f"cannot write {out}: folder {parent} is not writable")


def _absolute(out: Path) -> Path:
    """OUT with `..` and `.` resolved textually (not through links), so its name and folder are real."""
    return Path(os.path.abspath(out.expanduser()))


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _replace(tmp: Path, out: Path) -> None:
    """Put `tmp` in OUT's place; an old OUT is removed only once the new one is there."""
    with signals_deferred():
        if out.exists() or out.is_symlink():
            if _exchange(tmp, out):
                COMMITTED.append(out)
                _remove(tmp)  # now the old OUT
                return
            old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
            out.rename(old)
            tmp.rename(out)
            COMMITTED.append(out)
            _remove(old)
        else:
            tmp.rename(out)
            COMMITTED.append(out)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(root: Path) -> None:
    """mkdtemp/mkstemp and some writers make 0700/0600: give the output the modes the umask asks for."""
    mask = _umask()
    if root.is_file():
        root.chmod(0o666 & ~mask)
        return
    root.chmod(0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            Path(folder, name).chmod(0o777 & ~mask)
        for name in files:
            Path(folder, name).chmod(0o666 & ~mask)


@contextmanager
def atomic_dir(out: Path, overwrite: bool, kind: str = "adapter", inputs: tuple = ()) -> Iterator[Path]:
    """Yield a fresh temp folder; on success it becomes OUT, on any failure it disappears."""
    check_target(out, overwrite, kind, inputs)
    out = _absolute(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise TloraError(f"cannot write {out}: {e.strerror}") from e
    try:
        with terminate_as_interrupt():
            yield tmp
            _follow_umask(tmp)
            _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: Path, overwrite: bool, kind: str = "plan", inputs: tuple = ()) -> Iterator[Path]:
    """The same promise for a single file (a plan)."""
    if out.is_dir() and not out.is_symlink():
        raise TloraError(f"{out} is a folder: give a file name for the plan")
    check_target(out, overwrite, kind, inputs)
    out = _absolute(out)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    except OSError as e:
        raise TloraError(f"cannot write {out}: {e.strerror}") from e
    os.close(fd)
    tmp = Path(name)
    try:
        with terminate_as_interrupt():
            yield tmp
            _follow_umask(tmp)
            with signals_deferred():
                tmp.replace(out)
                COMMITTED.append(out)
    finally:
        tmp.unlink(missing_ok=True)
