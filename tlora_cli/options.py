"""Every option is declared once, as a field of an options class: default, help, flag names and check together.

The CLI's flags are generated from these fields (flags.py), and the library takes the same classes by keyword,
so a new option is one field. `Options.check()` runs every field's own check, then `check_together()` (what
depends on several fields), before any model, data or hub is touched.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import TloraError

FLAG = "tlora_flag"
Check = Callable[[Any], str | None]  # a problem with the value, in words, or None


@dataclass(frozen=True)
class Flag:
    """How one field appears on the command line: its help, its names (default --field-name) and its check."""

    help: str
    names: tuple[str, ...] = ()
    check: Check | None = None
    metavar: str | None = None
    fallback: Any = None  # what a None default stands for (`Options.value`): None tells "not given" apart
    recorded: bool = True  # whether the metadata records it (not an output path)

    def display(self, field: str, value: Any = None) -> str:
        """The long name a message uses: --seq-len; for an on/off flag, the one that sets `value` (--no-center for
        False), --center when no value is given."""
        long = next((n for n in self.names if n.startswith("--")), None) or "--" + field.replace("_", "-")
        on, _, off = long.partition("/")
        if value is False:
            return off or (on if self.names else f"--no-{on.removeprefix('--')}")
        return on


REQUIRED = dataclasses.MISSING  # an option's default when the flag must be given


def option(
    default: Any,
    help: str,
    *names: str,
    check: Check | None = None,
    metavar: str | None = None,
    fallback: Any = None,
    recorded: bool = True,
) -> Any:
    """A dataclass field that is also a command-line flag. With `fallback`, the default is None (so a flag given
    is told apart from one left alone) and `Options.value` reads the fallback in its place."""
    flag = Flag(help, names, check, metavar, fallback, recorded)
    if default is REQUIRED:
        return dataclasses.field(metadata={FLAG: flag})
    return dataclasses.field(default=default, metadata={FLAG: flag})


def flag_of(field: dataclasses.Field) -> Flag | None:
    return field.metadata.get(FLAG)


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of an options class that are flags (others are set by the library)."""
    return [f for f in dataclasses.fields(cls) if flag_of(f) is not None]


def display(cls: type, name: str) -> str:
    """A field's flag as messages write it."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    flag = flag_of(field)
    return flag.display(name) if flag else name


class Options:
    """Base of the options classes (dataclasses)."""

    def check(self) -> None:
        """Each flag's own check, then the checks across fields; the first problem is one TloraError."""
        for field in flag_fields(type(self)):
            flag = flag_of(field)
            value = getattr(self, field.name)
            problem = flag.check(value) if flag.check and value is not None else None
            if problem:
                raise TloraError(f"{flag.display(field.name)} {problem}")
        self.check_together()

    def check_together(self) -> None:
        """Checks that involve several fields; none by default."""

    def value(self, name: str) -> Any:
        """A field's value, its flag's fallback where it was left at None."""
        value = getattr(self, name)
        if value is None:
            field = next(f for f in dataclasses.fields(self) if f.name == name)
            flag = flag_of(field)
            return flag.fallback if flag else None
        return value

    def values(self) -> dict[str, Any]:
        """Every recorded flag's value, fallbacks applied: what the metadata records."""
        return {f.name: self.value(f.name) for f in flag_fields(type(self)) if flag_of(f).recorded}

    def given(self) -> list[str]:
        """The flags set to something other than their default (None-default flags: set at all)."""
        return [
            flag_of(f).display(f.name, getattr(self, f.name))
            for f in flag_fields(type(self))
            if getattr(self, f.name) != f.default
        ]


# Checks shared by many options. Each returns what is wrong ("must be ...") or None.


def at_least(low: int) -> Check:
    def check(value: int) -> str | None:
        return None if value >= low else f"must be at least {low}, got {value}"

    return check


def between(low: int, high: int) -> Check:
    def check(value: int) -> str | None:
        return None if low <= value <= high else f"must be between {low} and {high}, got {value}"

    return check


def one_of(choices: Iterable[str]) -> Check:
    choices = tuple(choices)

    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}; got {value!r}"

    return check


def positive(value: float) -> str | None:
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    return None if value > 0 else f"must be positive, got {value:g}"


def finite_non_negative(value: float) -> str | None:
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    return None if value >= 0 else f"must be 0 or more, got {value:g}"


def existing_folder(value: Path) -> str | None:
    return None if value.is_dir() else f"{value} is not an existing folder: create it first"


def not_blank(value: str) -> str | None:
    return "is empty: give a value, or drop the flag" if not value.strip() else None


NAME_MAX = 255  # bytes in one file name: ext4, XFS, btrfs, tmpfs, APFS (on NTFS, 255 UTF-16 units)


def output_name(value: Path, room: int = 0) -> str | None:
    """What makes a path one tlora cannot write to, checked before any work: bytes that are not UTF-8 (safetensors
    and the Hub open UTF-8 paths only), or a name that leaves no `room` for the temporary name written first."""
    try:
        str(value).encode("utf-8")
    except UnicodeEncodeError:
        return "its path is not UTF-8 (safetensors and the Hub take UTF-8 paths only); choose a UTF-8 name"
    size = len(os.fsencode(value.name))
    if size + room > NAME_MAX:
        return f"its name is {size} bytes, over the {NAME_MAX - room} an output name may have; choose a shorter one"
    return None
