"""How a published file names things: a local path by its last part, so that nothing tlora writes into a folder
that `--push-to-hub` uploads names the machine's directories (a hub id or a plain name passes as it is)."""

from __future__ import annotations

from pathlib import Path


def published(value: str) -> str:
    """`value` as a published file may show it: a path (absolute, home-relative, ./ or ../, or one that exists
    with a folder in it) by its last part."""
    path = Path(value).expanduser()
    if path.is_absolute() or value.startswith(("~", "./", "../")) or (len(path.parts) > 1 and path.exists()):
        return path.name or value
    return value
