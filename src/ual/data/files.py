"""Reading data files row by row; every file and text problem a DataError that names the place.

The layers every loader shares (`formats.py` adds the row's shape and fields on top):
  check_file(path)  the path is a readable, non-empty regular file; a missing path, a
                    directory, an unreadable or empty file each say which they are
  iter_rows(path)   (where, row) per row of a .jsonl / .json / .parquet file. A row that
                    cannot be used (not valid JSON, bytes that are not UTF-8, not an object)
                    comes as a DataError *value*, so `on_error: skip` skips and counts it
                    like any other bad row; what ends the file (a JSON list broken mid-way,
                    no rows at all) is raised.
Text is decoded with errors="surrogateescape" (ual/jsonl.py, the JSON Lines decoder shared with
ual.io): a stray non-UTF-8 byte does not stop the read, and the row that holds it is reported
with its line and field.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Iterator

from ual.jsonl import DataError, checked_text, json_error, jsonl_rows, open_text  # noqa: F401 (DataError re-exported)

SUFFIXES = (".jsonl", ".json", ".parquet")


def check_file(path: str | Path) -> Path:
    """`path` if it is a readable regular file with content; else a DataError saying what it is."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file", "file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})", "file") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path}: is a directory, not a data file (a source is one .jsonl, .json or "
                        ".parquet file)", "file")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: not a regular file", "file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})", "file") from None
    if st.st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes): no rows to read", "file")
    return path


# --------------------------------------------------------------------------- JSON lists

def iter_json_array(path: str | Path, truncated_ok: bool = False, chunk: int = 1 << 20) -> Iterator[tuple[int, object]]:
    """Yield (line, value) for each element of a top-level JSON list, reading it piece by piece.

    Memory holds one buffer (about a chunk), never the file: the 125 MB ShareGPT dump
    is read only as far as needed. With truncated_ok, a file cut off mid-record (that
    dump is) ends the iteration cleanly instead of raising. An element holding bytes
    that are not UTF-8 comes as a DataError value naming its line and field.
    """
    dec = json.JSONDecoder()
    with open_text(Path(path)) as fh:
        buf, pos, eof = "", 0, False
        line, mark = 1, 0  # `line` is the line number at buf[mark]

        def line_at(p: int) -> int:
            nonlocal line, mark
            if p > mark:
                line, mark = line + buf.count("\n", mark, p), p
            return line

        def more() -> bool:  # drop what is consumed; read at least as much as is held (linear retries)
            nonlocal buf, pos, mark, eof
            line_at(pos)
            buf, pos, mark = buf[pos:], 0, 0
            data = fh.read(max(chunk, len(buf)))
            eof = not data
            buf += data
            return not eof

        def skip(chars: str) -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf) or not more():
                    return

        skip(" \t\r\n")
        if pos >= len(buf) or buf[pos] != "[":
            raise DataError(f"{path}:{line_at(pos)}: expected a JSON list of objects", "file")
        pos += 1
        while True:
            skip(" \t\r\n,")
            if pos >= len(buf):
                if truncated_ok:
                    return
                raise DataError(f"{path}:{line_at(pos)}: file ends before the closing ']'", "file")
            if buf[pos] == "]":
                return
            try:
                value, end = dec.raw_decode(buf, pos)
                if end == len(buf) and not eof:  # a scalar may go on in the next chunk
                    raise json.JSONDecodeError("incomplete", buf, end)
            except json.JSONDecodeError as exc:
                if not eof:  # maybe only cut by the buffer: read on, then decode again
                    more()
                    continue
                if truncated_ok:
                    return
                where = f"{path}:{line_at(exc.pos)}"
                err = json_error(where, exc, buf[pos:exc.pos + 1])
                raise DataError(f"{err} (a JSON list cannot be read past broken syntax, whatever on_error "
                                "says: fix the file, or store one row per line as .jsonl)", err.kind) from None
            where = f"{path}:{line_at(pos)}"
            yield line_at(pos), checked_text(value, where, buf[pos:end])
            pos = end


# --------------------------------------------------------------------------- files

def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    for lineno, row in jsonl_rows(path):
        yield f"{path}:{lineno}", row


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    with open_text(path) as fh:
        first = fh.read(4096).lstrip()[:1]
    if first != "{":
        yield from ((f"{path}:{line}", row) for line, row in iter_json_array(path))
        return
    with open_text(path) as fh:  # {"data": [...]}: small enough to load whole
        try:
            obj = json.load(fh)
        except json.JSONDecodeError as exc:
            raise json_error(f"{path}:{exc.lineno}", exc, "") from None
    if not isinstance(obj.get("data"), list):
        raise DataError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}, found keys {sorted(obj)}",
                        "file")
    for i, row in enumerate(obj["data"]):
        yield f"{path}:data[{i}]", checked_text(row, f"{path}:data[{i}]")


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path}:row {i}", row
                i += 1
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: not a readable Parquet file (at row {i}: {exc})", "file") from None


def iter_rows(path: str | Path) -> Iterator[tuple[str, object]]:
    """(where, row) per row of a .jsonl / .json / .parquet file: a dict, or a DataError for a row that
    cannot be used; file-level problems are raised (see the module docstring)."""
    path = check_file(path)
    suffix = path.suffix.lower()
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type '{suffix}' (expected {', '.join(SUFFIXES)})", "file")
    n = 0
    for where, row in readers[suffix](path):
        n += 1
        if not isinstance(row, (dict, DataError)):
            row = DataError(f"{where}: expected a JSON object, got {type(row).__name__}", "not an object")
        yield where, row
    if n == 0:
        holds = {".jsonl": "only blank lines", ".json": "an empty list", ".parquet": "a table with 0 rows"}[suffix]
        raise DataError(f"{path}: no rows (the file holds {holds})", "file")


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield (where, row) for every row of a .jsonl / .json / .parquet file; the first bad row raises."""
    for where, row in iter_rows(path):
        if isinstance(row, DataError):
            raise row
        yield where, row
