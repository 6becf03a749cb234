"""Outputs appear whole or not at all: written into a temp folder beside OUT, renamed at the end."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import TloraError


def check_target(out: Path, overwrite: bool) -> None:
    """Fail before any work when OUT exists (and no --overwrite) or its folder is not writable."""
    if out.exists() and not overwrite:
        raise TloraError(f"{out} already exists: pass --overwrite to replace it, or choose another -o")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise TloraError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TloraError(f"cannot write {out}: folder {parent} is not writable")


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (a CI timeout, `kill`) into KeyboardInterrupt so cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)


@contextmanager
def atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temp folder; on success it becomes OUT, on any failure it disappears."""
    check_target(out, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.absolute().parent))
    except OSError as e:
        raise TloraError(f"cannot write {out}: {e.strerror}") from e
    try:
        with _terminate_as_interrupt():
            yield tmp
            _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: Path, overwrite: bool) -> Iterator[Path]:
    """The same promise for a single file (a plan)."""
    check_target(out, overwrite)
    if out.is_dir():
        raise TloraError(f"{out} is a folder: give a file name for the plan")
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.absolute().parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
