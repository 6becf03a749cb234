"""Outputs appear whole or not at all: written into a temp folder beside OUT, renamed at the end.

An existing OUT is replaced only under --overwrite and only when tlora wrote it (ownership.py), checked before any
work and again at the swap, under a lock beside OUT: an OUT that appeared meanwhile (a second run to the same -o)
is never replaced without --overwrite, so of two runs one wins and the other says so. The new one is swapped into
place before the old one is removed, and an interrupt during the swap waits for it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
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
from .ownership import check_output, output_flag


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
        raise TloraError(f"{out} already exists: pass --overwrite to replace it, or choose another {output_flag(kind)}")
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


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(a: Path, b: Path, flags: int) -> int | None:
    """rename(2) with flags (Linux renameat2): 0, or the errno it failed with; None where the C library lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return None
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags)
    return 0 if result == 0 else ctypes.get_errno()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """An exclusive lock on `.NAME.lock` beside OUT while its state is checked and the output put in place, so two
    tlora runs cannot both find OUT free; the file is removed after, by its holder (a waiter that then holds a
    removed file's lock tries again)."""
    lock = out.with_name(f".{out.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise TloraError(f"cannot write {out}: cannot make its lock file {lock}: {e.strerror}") from e
        if not _lock(fd) or _same_file(fd, lock):
            break  # held; or a file system without locks, where renameat2 alone keeps OUT
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _lock(fd: int) -> bool:
    """Wait for the exclusive lock; False where the file system has none (some network file systems)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        current = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev)


def _appeared(out: Path, kind: str) -> TloraError:
    return TloraError(
        f"{out} appeared while this run was writing it (another run or program made it): this run's result was "
        f"discarded and {out} left as it is; choose another {output_flag(kind)}, or pass --overwrite to replace it"
    )


def _put_in_place(tmp: Path, out: Path, overwrite: bool, kind: str) -> Path | None:
    """Under the lock: OUT checked again as it is now, then `tmp` renamed onto it; the old OUT's new path (to
    remove), or None. Without --overwrite an OUT that appeared meanwhile stays and this run's result is refused."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise _appeared(out, kind)
        check_output(out, kind, overwrite)  # still tlora's own, not something put there meanwhile
        if _renameat2(tmp, out, _RENAME_EXCHANGE) == 0:
            return tmp  # now the old OUT
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
        out.rename(old)
        tmp.rename(out)
        return old
    code = _renameat2(tmp, out, _RENAME_NOREPLACE)  # fails if another program made OUT since the check
    if code == errno.EEXIST:
        raise _appeared(out, kind)
    if code != 0:  # no renameat2 here: a plain rename, which fails onto a folder that is not empty
        try:
            tmp.rename(out)
        except OSError as e:
            if out.exists() or out.is_symlink():
                raise _appeared(out, kind) from e
            raise TloraError(f"cannot write {out}: {e.strerror}") from e
    return None


def _replace(tmp: Path, out: Path, overwrite: bool, kind: str) -> None:
    """Put `tmp` in OUT's place; an old OUT is removed only once the new one is there."""
    with signals_deferred():
        with _locked(out):
            old = _put_in_place(tmp, out, overwrite, kind)
            COMMITTED.append(out)
        if old is not None:
            _remove(old)


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
        yield from _filled_then_placed(tmp, out, overwrite, kind)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _filled_then_placed(tmp: Path, out: Path, overwrite: bool, kind: str) -> Iterator[Path]:
    """Hand out tmp to be filled, then put it at OUT; a SIGTERM meanwhile unwinds as Ctrl-C does (cleanup runs)."""
    with terminate_as_interrupt():
        yield tmp
        _follow_umask(tmp)
        _replace(tmp, out, overwrite, kind)


@contextmanager
def atomic_file(out: Path, overwrite: bool, kind: str = "plan", inputs: tuple = ()) -> Iterator[Path]:
    """The same promise for a single file (a plan, a picture)."""
    if out.is_dir() and not out.is_symlink():
        raise TloraError(f"{out} is a folder: give a file name for the {kind}")
    check_target(out, overwrite, kind, inputs)
    out = _absolute(out)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    except OSError as e:
        raise TloraError(f"cannot write {out}: {e.strerror}") from e
    os.close(fd)
    tmp = Path(name)
    try:
        yield from _filled_then_placed(tmp, out, overwrite, kind)
    finally:
        tmp.unlink(missing_ok=True)
