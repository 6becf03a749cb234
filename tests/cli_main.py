"""`tlora` run in this process from a module-scope fixture, where pytest's function-scope capsys cannot go."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tlora_cli.cli import main


def run_main(*args: str | Path | int | float) -> None:
    """`tlora ARGS`, which must exit 0."""
    saved, sys.argv = sys.argv, ["tlora", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:
        sys.argv = saved
    assert done.value.code == 0
