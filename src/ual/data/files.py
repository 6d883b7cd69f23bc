"""Reading data files row by row; every file and text problem a DataError that names the place.

The layers every loader shares (`formats.py` adds the row's shape and fields on top):
  check_file(path)  the path is a readable, non-empty regular file; a missing path, a
                    directory, an unreadable or empty file each say which they are
  check_text(path)  a .jsonl / .json file is UTF-8 text: one that is compressed (gzip, bz2,
                    xz, zstd, zip), a Parquet file, or UTF-16/UTF-32 text is refused whole,
                    saying which, instead of failing on every row with a decoding error
  iter_rows(path)   (where, row) per row of a .jsonl / .json / .parquet file. A row that
                    cannot be used (not valid JSON, bytes that are not UTF-8, not an object,
                    a key given twice, nesting too deep to parse) comes as a DataError *value*,
                    so `on_error: skip` skips and counts it like any other bad row; what ends
                    the file (a JSON list broken mid-way, anything after its closing ']', no
                    rows at all, an I/O error) is raised.
Text is decoded with errors="surrogateescape" (ual/jsonl.py, the JSON Lines decoder shared with
ual.io): a stray non-UTF-8 byte does not stop the read, and the row that holds it is reported
with its line and field.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Iterator

from ual.jsonl import (DataError, Decoder, checked_text, json_error, jsonl_rows, limit_error, open_text,
                       repeated_key_error, type_name)

SUFFIXES = (".jsonl", ".json", ".parquet")

# What the first bytes of a file that is not UTF-8 JSON text say it is (longest first: UTF-32LE's
# mark starts with UTF-16LE's).
MAGIC = (
    (b"\xff\xfe\x00\x00", "UTF-32 text (it starts with a byte-order mark), not UTF-8: re-save it as UTF-8"),
    (b"\x00\x00\xfe\xff", "UTF-32 text (it starts with a byte-order mark), not UTF-8: re-save it as UTF-8"),
    (b"\xff\xfe", "UTF-16 text (it starts with a byte-order mark), not UTF-8: re-save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text (it starts with a byte-order mark), not UTF-8: re-save it as UTF-8"),
    (b"\x1f\x8b", "gzip-compressed, not JSON text: decompress it first (gunzip)"),
    (b"BZh", "bzip2-compressed, not JSON text: decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "xz-compressed, not JSON text: decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed, not JSON text: decompress it first (unzstd)"),
    (b"PK\x03\x04", "a zip archive, not JSON text: extract the data file from it first"),
    (b"PAR1", "a Parquet file, not JSON text: give it the .parquet suffix"),
)
COMPRESSED = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd", ".zip": "zip", ".tgz": "gzip",
              ".7z": "7z"}


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


def check_text(path: Path) -> None:
    """Refuse a .jsonl / .json file whose first bytes show it is not UTF-8 JSON text (see MAGIC); a
    NUL byte among the first four is UTF-16 or UTF-32 without a byte-order mark (JSON text starts
    with an ASCII character), or binary data."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    for magic, what in MAGIC:
        if head.startswith(magic):
            raise DataError(f"{path}: {what}", "file")
    if b"\x00" in head[:4]:
        raise DataError(f"{path}: NUL bytes among its first characters: UTF-16 or UTF-32 text without a "
                        "byte-order mark, or binary data, not UTF-8 JSON text: re-save it as UTF-8", "file")


# --------------------------------------------------------------------------- JSON lists

def iter_json_array(path: str | Path, truncated_ok: bool = False, chunk: int = 1 << 20) -> Iterator[tuple[int, object]]:
    """Yield (line, value) for each element of a top-level JSON list, reading it piece by piece.

    Memory holds one buffer (about a chunk), never the file: the 125 MB ShareGPT dump
    is read only as far as needed. With truncated_ok, a file cut off mid-record (that
    dump is) ends the iteration cleanly instead of raising. An element holding bytes
    that are not UTF-8 comes as a DataError value naming its line and field.
    """
    dec = Decoder()
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
                pos += 1
                skip(" \t\r\n")
                if pos < len(buf) and not truncated_ok:
                    raise DataError(f"{path}:{line_at(pos)}: more text after the list's closing ']' (a .json "
                                    "file holds one list: merge the lists, or store one row per line as .jsonl)",
                                    "file")
                return
            try:
                value, end = dec.raw_decode(buf, pos)
                if end == len(buf) and not eof:  # a scalar may go on in the next chunk
                    raise json.JSONDecodeError("incomplete", buf, end)
            except (RecursionError, ValueError) as exc:
                if not isinstance(exc, json.JSONDecodeError):  # too deep, too many digits: no way past it
                    err = limit_error(f"{path}:{line_at(pos)}", exc)
                    raise DataError(f"{err} (a JSON list cannot be read past it, whatever on_error says: fix "
                                    "the file, or store one row per line as .jsonl)", err.kind) from None
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
            yield line_at(pos), checked_text(value, where, buf[pos:end], dec.repeated)
            pos = end


# --------------------------------------------------------------------------- files

def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    first = True
    for lineno, row in jsonl_rows(path):
        if first and (isinstance(row, list) or (isinstance(row, DataError) and row.kind == "invalid JSON")):
            with open_text(path) as fh:
                opens_list = next((t for t in fh if t.strip()), "").lstrip().startswith("[")
            if opens_list:  # a JSON list in a .jsonl file
                kind = "not an object" if isinstance(row, list) else row.kind
                what = "expected a JSON object, got list" if isinstance(row, list) else str(row)[len(f"{path}:{lineno}: "):]
                row = DataError(f"{path}:{lineno}: {what} (the file starts a JSON list: a list of rows is read "
                                "from a .json file, a .jsonl file holds one object per line)", kind)
        first = False
        yield f"{path}:{lineno}", row


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    with open_text(path) as fh:
        first = fh.read(4096).lstrip()[:1]
    if first != "{":
        yield from ((f"{path}:{line}", row) for line, row in iter_json_array(path))
        return
    dec = Decoder()
    with open_text(path) as fh:  # {"data": [...]}: small enough to load whole
        text = fh.read()
    try:
        obj = dec.parse(text)
    except json.JSONDecodeError as exc:
        err = json_error(f"{path}:{exc.lineno}", exc, text.split("\n")[exc.lineno - 1])
        if exc.msg == "Extra data" and text[exc.pos:exc.pos + 1] == "{":
            err = DataError(f"{err} (the file holds one JSON object after another: JSON Lines, read from a "
                            ".jsonl file)", err.kind)
        raise err from None
    except (RecursionError, ValueError) as exc:
        raise limit_error(str(path), exc) from None
    if dec.repeated_key(obj):
        raise repeated_key_error(str(path), dec.repeated_key(obj), "file")
    if not isinstance(obj.get("data"), list):
        raise DataError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}, found keys {sorted(obj)}",
                        "file")
    for i, row in enumerate(obj["data"]):
        yield f"{path}:data[{i}]", checked_text(row, f"{path}:data[{i}]", repeated=dec.repeated)


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
    if suffix in COMPRESSED:
        raise DataError(f"{path}: a {COMPRESSED[suffix]}-compressed file: decompress it first and give the "
                        f"{', '.join(SUFFIXES)} file inside as the source", "file")
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type '{suffix}' (expected {', '.join(SUFFIXES)})", "file")
    if suffix != ".parquet":
        check_text(path)
    n = 0
    rows = readers[suffix](path)
    while True:
        try:
            where, row = next(rows)
        except StopIteration:
            break
        except OSError as exc:  # the file went away or the disk failed mid-read
            raise DataError(f"{path}: cannot read (after {n} rows: {exc.strerror or exc})", "file") from None
        n += 1
        if not isinstance(row, (dict, DataError)):
            row = DataError(f"{where}: expected a JSON object, got {type_name(row)}", "not an object")
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
