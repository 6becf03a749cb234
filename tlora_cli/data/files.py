"""Reading calibration samples from local files.

Every problem is a TloraError naming the file (and the line or record) so that the user can fix the
data; nothing is skipped silently, because a silently shorter calibration set changes the adapter.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

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


MAX_LINE = 2**25  # characters in one line of a .jsonl, .csv or .txt file, at most (docs/reliability.md)
# json.loads' refusal of an integer longer than Python's int/str conversion limit (4300 digits)
_LONG_NUMBER = "a number too long to read (over 4300 digits); write it as a string in quotes"
# What surrogateescape makes of a byte that is not UTF-8: valid UTF-8 never decodes to these.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def read_samples(path: Path) -> list[Sample]:
    """Read every sample of a local .jsonl/.json/.parquet/.csv/.txt file (optionally .gz)."""
    return [record_to_sample(record, where) for where, record in _read(path)]


def read_records(path: Path) -> tuple[list[Record], str]:
    """((where, record) pairs, sha256 of the file's bytes as stored): the hash is a second pass in chunks, so
    that the file is never held whole."""
    records = _read(path)
    digest = hashlib.sha256()
    with _reading(path), path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(2**20), b""):
            digest.update(chunk)
    return records, digest.hexdigest()


def _read(path: Path) -> list[Record]:
    if path.exists() and not path.is_dir() and not path.is_file():  # a device or a pipe may never end
        raise TloraError(f"{path}: not a regular file (a device, pipe or socket); pass a data file")
    with _reading(path), path.open("rb") as stream:
        return _records(stream, str(path))


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """The file system's refusals, in the user's terms."""
    try:
        yield
    except FileNotFoundError:
        raise TloraError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise TloraError(f"{path}: is a directory; pass a data file ({FORMATS_HELP})") from None
    except PermissionError:
        raise TloraError(f"{path}: permission denied; make the file readable") from None
    except OSError as e:
        raise TloraError(f"{path}: cannot be read ({e.strerror}); check the file") from None


def parse_samples(raw: bytes, name: str) -> list[Sample]:
    """Samples from raw file bytes, each record's shape told by its field names."""
    return [record_to_sample(record, where) for where, record in parse_records(raw, name)]


def parse_records(raw: bytes, name: str) -> list[Record]:
    """(where, record) pairs from raw file bytes; `name` gives the format (by suffix) and labels every error.

    A .txt paragraph is the record {"text": paragraph}.
    """
    return _records(io.BufferedReader(io.BytesIO(raw)), name)


def _records(stream: BinaryIO, name: str) -> list[Record]:
    """The records of a file being read: line formats a line at a time (gzip too), .json and .parquet whole."""
    suffix, compressed = file_format(name)
    try:
        if compressed:
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        if not stream.peek(1):
            raise TloraError(f"{name}: the file is empty; give it at least one sample")
        if suffix in (".parquet", ".json"):
            raw = stream.read()
            records = _parquet_records(raw, name) if suffix == ".parquet" else _json_records(_text(raw, name), name)
        else:
            parse = {".jsonl": _jsonl_records, ".csv": _csv_records, ".txt": _txt_records}[suffix]
            records = parse(_lines(stream, name, newline="" if suffix == ".csv" else "\n"), name)
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise TloraError(f"{name}: not a valid gzip file; recompress it or drop the .gz suffix") from None
    if not records:
        raise TloraError(f"{name}: the file has no samples; give it at least one")
    return records


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TloraError(f"{name}: not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None


def _lines(stream: BinaryIO, name: str, newline: str) -> Iterator[tuple[int, str]]:
    """(number, line with its end) as read: a line over MAX_LINE characters is refused before more of it is
    read (a 1 GB line would take GBs), and one that is not UTF-8 is refused by its number."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline=newline)
    for number in itertools.count(1):
        line = text.readline(MAX_LINE + 2)  # room for the line's end, \r\n
        if not line:
            return
        if len(line) > MAX_LINE and len(line.rstrip("\r\n")) > MAX_LINE:
            raise TloraError(
                f"{name}: line {number} is longer than {MAX_LINE:,} characters; split it into records or shorten it"
            )
        bad = _NOT_UTF8.search(line)
        if bad:
            raise TloraError(
                f"{name}: line {number}: not UTF-8 text (bad byte at column {bad.start() + 1}); save it as UTF-8"
            )
        yield number, line


def _jsonl_records(lines: Iterable[tuple[int, str]], name: str) -> list[Record]:
    records = []
    # Lines end at "\n" only: str.splitlines() would also split inside strings holding U+2028 and the like.
    for number, line in lines:
        if not line.strip():
            continue
        where = f"{name}: line {number}"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise TloraError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); fix the line") from None
        except RecursionError:
            raise TloraError(f"{where}: JSON nested too deeply to be a record; fix the line") from None
        except ValueError:  # the one other refusal of json.loads
            raise TloraError(f"{where}: {_LONG_NUMBER}") from None
    return records


def _json_records(text: str, name: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TloraError(f"{name}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix it") from None
    except RecursionError:
        raise TloraError(f"{name}: JSON nested too deeply to hold records; fix it") from None
    except ValueError:
        raise TloraError(f"{name}: {_LONG_NUMBER}") from None
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


def _csv_records(lines: Iterable[tuple[int, str]], name: str) -> list[Record]:
    reader = csv.DictReader(line for _, line in lines)
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


def _txt_records(lines: Iterable[tuple[int, str]], name: str) -> list[Record]:
    """Paragraphs (blank-line separated) are samples; a file without blank lines has one per line."""
    paragraphs = list(_paragraphs(line.removesuffix("\n").removesuffix("\r") for _, line in lines))
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
