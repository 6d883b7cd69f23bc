"""JSON Lines decoded line by line, every problem named by file, line and (for bad text) field.

The one decoder of .jsonl text in ual: `ual.io.iter_jsonl` (the run folder's own files: the first
bad line raises) and `ual.data.files` (a user's data: a bad row is a value `on_error: skip` can
skip and count) both read through `jsonl_rows`.
Text is decoded with errors="surrogateescape": a stray non-UTF-8 byte does not stop the read, and
the row that holds it is reported with its line and field.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterator


class DataError(ValueError):
    """A row (or file) that cannot be used, with where it is and what is wrong.

    `kind` groups the rows `on_error: skip` skips ("invalid JSON", "missing field", ...).
    """

    def __init__(self, message: str, kind: str = "invalid row"):
        super().__init__(message)
        self.kind = kind


_SURROGATE = re.compile("[\ud800-\udfff]")


def _find_surrogate(value, field: str) -> tuple[str, str] | None:
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        return (field, m.group()) if m else None
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{field}.{k}" if field else str(k)
            found = _find_surrogate(k, sub) or _find_surrogate(v, sub)
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _find_surrogate(v, f"{field}[{i}]")
            if found:
                return found
    return None


def _describe(ch: str, at: str = "") -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that surrogateescape could not decode
        return f"invalid UTF-8 byte 0x{code - 0xDC00:02x}{at} (the file is not UTF-8 text: re-save it as UTF-8)"
    return f"lone surrogate \\u{code:04x}{at} (not a character; it cannot be written as UTF-8)"


def checked_text(value, where: str, raw: str | None = None):
    """`value`, or a DataError naming the field that holds text no UTF-8 file can hold.

    `raw`, the JSON text `value` was parsed from, lets the common case (clean text) skip the walk.
    """
    if raw is not None and not _SURROGATE.search(raw) and "\\ud" not in raw and "\\uD" not in raw:
        return value
    found = _find_surrogate(value, "")
    if found is None:
        return value
    field, ch = found
    return DataError(f"{where}: field '{field}': {_describe(ch)}" if field else f"{where}: {_describe(ch)}",
                     "invalid UTF-8")


def json_error(where: str, exc: json.JSONDecodeError, text: str) -> DataError:
    bad = _SURROGATE.search(text)
    if bad:  # a stray byte outside a string breaks the JSON: the byte is the news
        return DataError(f"{where}: {_describe(bad.group(), f' at column {bad.start() + 1}')}", "invalid UTF-8")
    return DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})", "invalid JSON")


def open_text(path: str | os.PathLike):
    return open(path, encoding="utf-8-sig", errors="surrogateescape")


def jsonl_rows(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, parsed value or DataError) for each non-blank line."""
    with open_text(path) as fh:
        for lineno, text in enumerate(fh, 1):
            if not text.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield lineno, json_error(where, exc, text)
                continue
            yield lineno, checked_text(row, where, text)
