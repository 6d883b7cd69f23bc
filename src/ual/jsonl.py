"""JSON Lines decoded line by line, every problem named by file, line and (for bad text) field.

The one decoder of .jsonl text in ual: `ual.io.iter_jsonl` (the run folder's own files: the first
bad line raises) and `ual.data.files` (a user's data: a bad row is a value `on_error: skip` can
skip and count) both read through `jsonl_rows`; `Decoder` is also what `ual.data.files` parses
.json files with. Text is decoded with errors="surrogateescape": a stray non-UTF-8 byte does not
stop the read, and the row that holds it is reported with its line and field.

Whatever the JSON text holds, decoding it gives a value or a DataError naming the place, never
another exception: broken syntax, a key given twice in one object (JSON would keep only the last
value, silently losing the other: refused, naming the field), nesting too deep for the parser,
an integer with more digits than Python converts, NUL bytes. NaN and Infinity are read as Python
reads them (the data stage does not carry non-finite numbers into a sample).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Callable, Iterator


class DataError(ValueError):
    """A row (or file) that cannot be used, with where it is and what is wrong.

    `kind` groups the rows `on_error: skip` skips ("invalid JSON", "missing field", ...).
    """

    def __init__(self, message: str, kind: str = "invalid row"):
        super().__init__(message)
        self.kind = kind


_SURROGATE = re.compile("[\ud800-\udfff]")


class _Repeated(dict):
    """A JSON object whose text gave `key` more than once (a plain dict keeps only the last value)."""

    key: str = ""


def _find(value, bad: Callable[[object], bool]) -> tuple[str, object] | None:
    """The first (field path, node) in document order for which bad(node) holds; keys are nodes too.
    Iterative, so a value nested as deep as the parser allows is walked without recursion."""
    stack = [("", value)]
    while stack:
        field, node = stack.pop()
        if bad(node):
            return field, node
        if isinstance(node, dict):
            items = []
            for k, v in node.items():
                sub = f"{field}.{k}" if field else str(k)
                items += [(sub, k), (sub, v)]
            stack.extend(reversed(items))
        elif isinstance(node, list):
            stack.extend(reversed([(f"{field}[{i}]", v) for i, v in enumerate(node)]))
    return None


def _describe(ch: str, at: str = "") -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that surrogateescape could not decode
        return f"invalid UTF-8 byte 0x{code - 0xDC00:02x}{at} (the file is not UTF-8 text: re-save it as UTF-8)"
    return f"lone surrogate \\u{code:04x}{at} (not a character; it cannot be written as UTF-8)"


def type_name(value) -> str:
    """A value's type as a message names it: JSON's null for None, else the Python type."""
    return "null" if value is None else type(value).__name__


def repeated_key_error(where: str, field: str, kind: str = "duplicate key") -> DataError:
    return DataError(f"{where}: field '{field}': key given twice in one object (JSON keeps only the last value "
                     "and would lose the other: remove one)", kind)


def checked_text(value, where: str, raw: str | None = None, repeated: bool = True):
    """`value`, or a DataError naming the field that holds text no UTF-8 file can hold, or (when
    `repeated`, i.e. the decoder saw a key given twice; default: look) the object that gave a key twice.

    `raw`, the JSON text `value` was parsed from, lets the common case (clean text) skip the walk.
    """
    if repeated:
        found = _find(value, lambda n: isinstance(n, _Repeated))
        if found is not None:
            field, obj = found
            return repeated_key_error(where, f"{field}.{obj.key}" if field else obj.key)
    if raw is not None and not _SURROGATE.search(raw) and "\\ud" not in raw and "\\uD" not in raw:
        return value
    found = _find(value, lambda n: isinstance(n, str) and _SURROGATE.search(n) is not None)
    if found is None:
        return value
    field, text = found
    ch = _SURROGATE.search(text).group()
    return DataError(f"{where}: field '{field}': {_describe(ch)}" if field else f"{where}: {_describe(ch)}",
                     "invalid UTF-8")


def json_error(where: str, exc: json.JSONDecodeError, text: str) -> DataError:
    bad = _SURROGATE.search(text)
    if bad:  # a stray byte outside a string breaks the JSON: the byte is the news
        return DataError(f"{where}: {_describe(bad.group(), f' at column {bad.start() + 1}')}", "invalid UTF-8")
    nul = text.find("\x00")
    if nul >= 0:
        return DataError(f"{where}: NUL byte at column {nul + 1} (binary data, or text that is not UTF-8, "
                         "e.g. UTF-16: not JSON text)", "invalid JSON")
    msg = exc.msg if exc.msg.endswith(" at") else f"{exc.msg} at"  # "Unterminated string starting at"
    return DataError(f"{where}: not valid JSON ({msg} column {exc.colno})", "invalid JSON")


def limit_error(where: str, exc: BaseException) -> DataError:
    """A DataError for what the parser raises besides JSONDecodeError: too deep, too many digits."""
    if isinstance(exc, RecursionError):
        return DataError(f"{where}: not readable JSON (lists or objects nested deeper than about "
                         f"{sys.getrecursionlimit()} levels)", "invalid JSON")
    limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
    return DataError(f"{where}: not readable JSON (an integer with more than {limit} digits: write it as a "
                     "string)", "invalid JSON")


class Decoder:
    """json.JSONDecoder that marks objects giving a key twice, for `checked_text` to name the field;
    `repeated` says whether the last decode saw one (so clean rows skip the walk)."""

    def __init__(self):
        self.repeated = False
        self._dec = json.JSONDecoder(object_pairs_hook=self._object)

    def _object(self, pairs):
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set = set()
            obj = _Repeated(obj)
            obj.key = next(k for k, _ in pairs if k in seen or seen.add(k))
            self.repeated = True
        return obj

    def raw_decode(self, text: str, pos: int = 0) -> tuple[object, int]:
        """(value, end) as json's raw_decode; may raise JSONDecodeError, RecursionError, ValueError."""
        self.repeated = False
        return self._dec.raw_decode(text, pos)

    def parse(self, text: str):
        """The one JSON value in `text` (json.loads); raises as raw_decode does."""
        self.repeated = False
        return self._dec.decode(text)

    @staticmethod
    def repeated_key(obj) -> str | None:
        """The key `obj` (this object itself, not what it holds) was given twice, if any."""
        return obj.key if isinstance(obj, _Repeated) else None

    def decode(self, text: str, where: str):
        """The one JSON value in `text`: a value (clean text, no repeated key) or a DataError."""
        try:
            value = self.parse(text)
        except json.JSONDecodeError as exc:
            return json_error(where, exc, text)
        except (RecursionError, ValueError) as exc:  # ValueError: an integer past Python's digit limit
            return limit_error(where, exc)
        return checked_text(value, where, text, self.repeated)


def open_text(path: str | os.PathLike):
    return open(path, encoding="utf-8-sig", errors="surrogateescape")


def jsonl_rows(path: str | os.PathLike, only: Callable[[str], bool] | None = None) -> Iterator[tuple[int, object]]:
    """(line number, parsed value or DataError) for each non-blank line (given `only`: each line whose text
    it accepts, the others left unparsed). A bad last line that has no line end says the file may be cut off."""
    dec = Decoder()
    with open_text(path) as fh:
        for lineno, text in enumerate(fh, 1):
            if not text.strip() or (only is not None and not only(text)):
                continue
            row = dec.decode(text, f"{path}:{lineno}")
            if isinstance(row, DataError) and row.kind == "invalid JSON" and not text.endswith(("\n", "\r")):
                row = DataError(f"{row} (the last line has no line end: was the file cut off?)", row.kind)
            yield lineno, row
