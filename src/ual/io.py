"""Small file helpers shared by every stage: atomic writes and JSON Lines.

Outputs are written to a temporary file in the same folder and renamed into
place, so a crash never leaves a half-written file where a later stage (or a
resumed run) would trust it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from ual.jsonl import jsonl_rows


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; rename it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@contextmanager
def atomic_path(path: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """A temporary sibling of `path` (a file, or with folder=True a folder) for writers that take a
    path (save_pretrained, to_parquet, save_to_disk); on success it takes `path`'s place. Whatever was
    at `path` (file or folder) is moved aside first and removed only once the new one is in place,
    so a failure at any point leaves the previous output, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def _replace(new: Path, out: Path) -> None:
    if not (out.exists() or out.is_symlink()):
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent)) / out.name
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)  # put the previous output back
        raise
    finally:
        shutil.rmtree(old.parent, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, sort_keys=False)
        fh.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def iter_jsonl(path: str | os.PathLike, only=None) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank line of a JSON Lines file (given `only`, a test of a line's
    text: the lines it accepts; the others are not parsed, so a pass for a few rows stays fast).

    A bad line is a ValueError naming the file and line (ual/jsonl.py): bytes that are not UTF-8
    (with the field that holds them), not valid JSON, or not a JSON object.
    """
    for lineno, row in jsonl_rows(path, only):
        if isinstance(row, Exception):
            raise row
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield lineno, row


def jsonl_columns(path: str | os.PathLike, schema, check=None, dictionary: tuple[str, ...] = ()):
    """Fields of a JSON Lines file as a pyarrow Table (schema: a pyarrow schema of the fields wanted; a
    struct reads fields inside an object; absent fields are null, other fields are skipped), parsed by
    Arrow's reader a block at a time without a Python object per row: the way stages read columns of
    files with a million rows. Memory: the columns wanted, not the file. Text fields named in
    `dictionary` (few distinct values: a source, a scorer) are dictionary-encoded block by block, so a
    million rows cost their int32 codes. When Arrow refuses the file, `check(lineno, row)` (or plain
    parsing) walks it line by line to raise the error naming the file, line and field."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    encoded = pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), f.type)) if f.name in dictionary else f
                         for f in schema])
    if Path(path).stat().st_size == 0:
        return encoded.empty_table()
    options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        _check_utf8(path)  # Arrow passes bytes that are not UTF-8 through (in fields it skips, unseen)
        batches = [pa.record_batch([pc.dictionary_encode(column) if name in dictionary else column
                                    for name, column in zip(batch.schema.names, batch.columns)], schema=encoded)
                   for batch in pj.open_json(path, parse_options=options)]
        return pa.Table.from_batches(batches, schema=encoded).unify_dictionaries()
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        rows = 0
        for rows, (lineno, row) in enumerate(iter_jsonl(path), 1):
            if check is not None:
                check(lineno, row)
        if not rows:  # blank lines only (the streaming reader calls that an empty stream)
            return encoded.empty_table()
        raise ValueError(f"{path}: cannot be read as columns {schema.names} ({exc})") from None


def _check_utf8(path) -> None:
    """UnicodeDecodeError unless the whole file is UTF-8 (read in 4 MB blocks: GB/s, flat memory)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            decoder.decode(block)
    decoder.decode(b"", final=True)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON Lines file; a bad line is an error naming the file and line (see iter_jsonl)."""
    return [row for _, row in iter_jsonl(path)]
