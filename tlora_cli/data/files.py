"""Reading calibration samples from local files.

Every problem is a TloraError naming the file (and the line or record) so that the user can fix the
data; nothing is skipped silently, because a silently shorter calibration set changes the adapter.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import TloraError
from .records import record_to_sample, type_name
from .samples import Sample

Record = tuple[str, Any]  # (where, as errors name it; the raw record)

FORMATS = (".jsonl", ".json", ".parquet", ".csv", ".txt")
FORMATS_HELP = ".jsonl, .json, .parquet, .csv or .txt (each optionally .gz-compressed)"


def file_format(name: str) -> tuple[str, bool]:
    """(format suffix, gzip-compressed?) from the name alone: contents are not sniffed."""
    lower = name.lower()
    compressed = lower.endswith(".gz")
    if compressed:
        lower = lower[: -len(".gz")]
    for suffix in FORMATS:
        if lower.endswith(suffix):
            return suffix, compressed
    raise TloraError(f"{name}: unknown file type; use {FORMATS_HELP}")


def read_bytes(path: Path) -> bytes:
    if path.exists() and not path.is_dir() and not path.is_file():  # a device or a pipe may never end
        raise TloraError(f"{path}: not a regular file (a device, pipe or socket); pass a data file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TloraError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise TloraError(f"{path}: is a directory; pass a data file ({FORMATS_HELP})") from None
    except PermissionError:
        raise TloraError(f"{path}: permission denied; make the file readable") from None
    except OSError as e:
        raise TloraError(f"{path}: cannot be read ({e.strerror}); check the file") from None


def read_samples(path: Path) -> list[Sample]:
    """Read every sample of a local .jsonl/.json/.parquet/.csv/.txt file (optionally .gz)."""
    return parse_samples(read_bytes(path), str(path))


def read_records(path: Path) -> tuple[list[Record], str]:
    """((where, record) pairs, sha256 of the file's bytes as stored), from one read of the file."""
    raw = read_bytes(path)
    return parse_records(raw, str(path)), hashlib.sha256(raw).hexdigest()


def parse_samples(raw: bytes, name: str) -> list[Sample]:
    """Samples from raw file bytes, each record's shape told by its field names."""
    return [record_to_sample(record, where) for where, record in parse_records(raw, name)]


def parse_records(raw: bytes, name: str) -> list[Record]:
    """(where, record) pairs from raw file bytes; `name` gives the format (by suffix) and labels every error.

    A .txt paragraph is the record {"text": paragraph}.
    """
    suffix, compressed = file_format(name)
    if compressed:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            raise TloraError(f"{name}: not a valid gzip file; recompress it or drop the .gz suffix") from None
    if not raw:
        raise TloraError(f"{name}: the file is empty; give it at least one sample")
    if suffix == ".parquet":
        records = _parquet_records(raw, name)
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise TloraError(f"{name}: not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None
        if suffix == ".jsonl":
            records = _jsonl_records(text, name)
        elif suffix == ".json":
            records = _json_records(text, name)
        elif suffix == ".csv":
            records = _csv_records(text, name)
        else:
            records = _txt_records(text, name)
    if not records:
        raise TloraError(f"{name}: the file has no samples; give it at least one")
    return records


def _jsonl_records(text: str, name: str) -> list[Record]:
    records = []
    # Split on "\n" only: str.splitlines() would also split inside strings holding U+2028 and the like.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{name}: line {number}"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise TloraError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); fix the line") from None
        except RecursionError:
            raise TloraError(f"{where}: JSON nested too deeply to be a record; fix the line") from None
    return records


def _json_records(text: str, name: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TloraError(f"{name}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix it") from None
    except RecursionError:
        raise TloraError(f"{name}: JSON nested too deeply to hold records; fix it") from None
    if isinstance(data, dict):
        key = next((k for k in ("data", "train") if isinstance(data.get(k), list)), None)
        if key is None:
            raise TloraError(
                f"{name}: expected a list of records, or an object with a 'data' or 'train' list "
                f"(it has {', '.join(repr(k) for k in data) or 'no keys'}); reshape the file"
            )
        data = data[key]
    if not isinstance(data, list):
        raise TloraError(f"{name}: expected a list of records at the top level, got {type_name(data)}")
    return [(f"{name}: record {i}", record) for i, record in enumerate(data, start=1)]


def _csv_records(text: str, name: str) -> list[Record]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    try:
        for row in reader:
            where = f"{name}: line {reader.line_num}"
            if None in row:
                raise TloraError(f"{where}: more values than header columns; quote fields that contain commas")
            if None in row.values():
                raise TloraError(f"{where}: fewer values than header columns; fill in the missing ones")
            records.append((where, row))
    except csv.Error as e:
        # line_num counts the lines read successfully; the bad one is the next.
        raise TloraError(
            f"{name}: line {reader.line_num + 1}: malformed CSV ({e}); fix the quoting, or use .jsonl for long texts"
        ) from None
    return records


def _parquet_records(raw: bytes, name: str) -> list[Record]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise TloraError(f"{name}: reading Parquet needs pyarrow; run `pip install pyarrow`") from None
    try:
        rows = pq.read_table(pa.BufferReader(raw)).to_pylist()
    except (pa.ArrowException, OSError) as e:
        reason = " ".join(str(e).split())
        raise TloraError(f"{name}: not a readable Parquet file ({reason}); rewrite it") from None
    return [(f"{name}: record {i}", row) for i, row in enumerate(rows, start=1)]


def _txt_records(text: str, name: str) -> list[Record]:
    """Paragraphs (blank-line separated) are samples; a file without blank lines has one per line."""
    paragraphs = list(_paragraphs(line.removesuffix("\r") for line in text.split("\n")))
    texts = paragraphs[0] if len(paragraphs) == 1 else ["\n".join(lines) for lines in paragraphs]
    return [(f"{name}: sample {i}", {"text": t}) for i, t in enumerate(texts, start=1)]


def _paragraphs(lines: Iterable[str]) -> Iterator[list[str]]:
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block
