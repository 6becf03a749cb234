"""JSON objects read from the user's folders: one line when a file is not one, or nothing where a guess is asked."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TloraError

MAX_JSON_BYTES = 64 << 20  # no config, manifest or plan tlora reads is near this; a larger file is not one


def read_object(path: Path, advice: str) -> dict:
    """The JSON object in `path`, or a TloraError naming the file and ending in `advice` (what to do)."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise TloraError(
                f"{path} is over {MAX_JSON_BYTES >> 20} MB, too large for a JSON file tlora reads: {advice}"
            )
        doc = json.loads(path.read_bytes())
    except TloraError:
        raise
    except OSError as e:
        raise TloraError(f"cannot read {path}: {e.strerror or e}: {advice}") from e
    except json.JSONDecodeError as e:
        raise TloraError(f"{path} is not valid JSON (line {e.lineno}): {advice}") from e
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise TloraError(f"{path} is not a readable JSON text ({type(e).__name__}): {advice}") from e
    if not isinstance(doc, dict):
        raise TloraError(f"{path} holds a {type(doc).__name__}, not a JSON object: {advice}")
    return doc


def maybe_object(path: Path) -> dict | None:
    """The JSON object in `path`, or None when there is none to read (missing, too large, not JSON, no object)."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
            return None
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def dump(value: object) -> str:
    """Indented JSON with a final newline; a NaN or inf is refused (ValueError), as JSON has none."""
    return json.dumps(value, indent=2, allow_nan=False) + "\n"
