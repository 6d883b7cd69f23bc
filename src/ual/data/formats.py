"""Row shapes people store chat data in, normalised to one: a list of chat messages.

Supported shapes (`detect_format` picks one per row; a source may force one):
  messages           {"messages": [{"role": "user", "content": "..."}, ...]}   (OpenAI chat)
  sharegpt           {"conversations": [{"from": "human", "value": "..."}, ...]}
  alpaca             {"instruction": ..., "input": ..., "output": ...}
  prompt_completion  {"prompt": ..., "completion": ...}  (or "response"; strings or message lists)
  lima               {"conversations": ["user turn", "assistant turn", ...]}

Every problem is a `DataError` naming the file, the line (or row) and the field, so a
user can open the file at the right place: "train.jsonl:7: field 'conversations[2].value':
empty response". `load_file(..., on_error="skip")` skips such rows and counts them instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ual.data.sample import Sample

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "lima")
SHAPES = ("messages [{role, content}], sharegpt conversations [{from, value}], "
          "alpaca {instruction, input, output}, prompt_completion {prompt, completion|response}, "
          "lima conversations [str, str, ...]")

# ShareGPT speaker names seen in the wild -> chat roles.
SPEAKERS = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant", "bot": "assistant", "claude": "assistant",
    "system": "system",
}


class DataError(ValueError):
    """A row (or file) that cannot be used, with where it is and what is wrong."""


def _fail(where: str, field: str | None, msg: str) -> DataError:
    return DataError(f"{where}: field '{field}': {msg}" if field else f"{where}: {msg}")


# --------------------------------------------------------------------------- shapes

def _has(row: dict, key: str) -> bool:
    return row.get(key) is not None  # Parquet rows carry absent columns as None


def detect_format(row: dict) -> str:
    """Name the shape of one row, or raise listing the keys found and the shapes known."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object per row, got {type(row).__name__}")
    if _has(row, "messages"):
        return "messages"
    if _has(row, "conversations"):
        conv = row["conversations"]
        if isinstance(conv, list) and conv and all(isinstance(t, str) for t in conv):
            return "lima"
        return "sharegpt"
    if _has(row, "instruction") and _has(row, "output"):
        return "alpaca"
    if _has(row, "prompt") and (_has(row, "completion") or _has(row, "response")):
        return "prompt_completion"
    raise DataError(f"unknown format: found keys {sorted(row)}; supported shapes: {SHAPES}")


def _turns(turns, field: str, where: str, speaker_key: str, text_key: str) -> list[dict]:
    """Turn dicts -> messages. Accepts role/content and from/value alike, names fields as given."""
    if not isinstance(turns, list):
        raise _fail(where, field, f"expected a list of turns, got {type(turns).__name__}")
    out = []
    for i, t in enumerate(turns):
        f = f"{field}[{i}]"
        if not isinstance(t, dict):
            raise _fail(where, f, f"expected an object with '{speaker_key}' and '{text_key}', got {type(t).__name__}")
        sk = speaker_key if speaker_key in t else ("role" if "role" in t else "from")
        tk = text_key if text_key in t else ("content" if "content" in t else "value")
        if sk not in t:
            raise _fail(where, f"{f}.{speaker_key}", "missing")
        if tk not in t:
            raise _fail(where, f"{f}.{text_key}", "missing")
        speaker = t[sk]
        role = SPEAKERS.get(speaker.strip().lower()) if isinstance(speaker, str) else None
        if role is None:
            raise _fail(where, f"{f}.{sk}", f"unknown role {speaker!r} (expected one of {sorted(SPEAKERS)})")
        out.append({"role": role, "content": t[tk], "_field": f"{f}.{tk}", "_role_field": f"{f}.{sk}"})
    return out


def _text(row: dict, key: str, where: str) -> str:
    if key not in row or row[key] is None:
        raise _fail(where, key, "missing")
    if not isinstance(row[key], str):
        raise _fail(where, key, f"expected a string, got {type(row[key]).__name__}")
    return row[key]


def _alpaca(row: dict, where: str) -> list[dict]:
    prompt = _text(row, "instruction", where)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise _fail(where, "input", f"expected a string, got {type(extra).__name__}")
    if extra and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    return [{"role": "user", "content": prompt, "_field": "instruction"},
            {"role": "assistant", "content": _text(row, "output", where), "_field": "output"}]


def _prompt_completion(row: dict, where: str) -> list[dict]:
    key = "completion" if _has(row, "completion") else "response"
    prompt, answer = row.get("prompt"), row.get(key)
    if isinstance(prompt, list):  # TRL's conversational prompt/completion: lists of messages
        msgs = _turns(prompt, "prompt", where, "role", "content")
        if isinstance(answer, list):
            return msgs + _turns(answer, key, where, "role", "content")
        return msgs + [{"role": "assistant", "content": _text(row, key, where), "_field": key}]
    return [{"role": "user", "content": _text(row, "prompt", where), "_field": "prompt"},
            {"role": "assistant", "content": _text(row, key, where), "_field": key}]


def _lima(row: dict, where: str) -> list[dict]:
    conv = row.get("conversations")
    if not isinstance(conv, list):
        raise _fail(where, "conversations", "expected a list of strings")
    return [{"role": ("user", "assistant")[i % 2], "content": t, "_field": f"conversations[{i}]"}
            for i, t in enumerate(conv)]


def normalize_record(row: dict, fmt: str = "auto", where: str = "row") -> list[dict]:
    """One row -> validated chat messages [{"role", "content"}], or a DataError saying why not.

    Rules: contents are strings; no empty user or assistant turn (an empty system turn is
    dropped, there is nothing to render); the first non-system turn is the user's; at least
    one assistant turn; turns after the last assistant reply are dropped (nothing in them
    would be supervised).
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if fmt == "auto":
        try:
            fmt = detect_format(row)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    if fmt == "messages":
        msgs = _turns(row.get("messages"), "messages", where, "role", "content")
    elif fmt == "sharegpt":
        msgs = _turns(row.get("conversations"), "conversations", where, "from", "value")
    elif fmt == "alpaca":
        msgs = _alpaca(row, where)
    elif fmt == "prompt_completion":
        msgs = _prompt_completion(row, where)
    elif fmt == "lima":
        msgs = _lima(row, where)
    else:
        raise DataError(f"{where}: unknown format '{fmt}' (expected auto or one of {', '.join(FORMATS)})")
    return _validate(msgs, where)


def _validate(msgs: list[dict], where: str) -> list[dict]:
    out = []
    for m in msgs:
        role, content, field = m["role"], m["content"], m["_field"]
        if not isinstance(content, str):
            raise _fail(where, field, f"expected a string, got {type(content).__name__}")
        if not content.strip():
            if role == "system":
                continue
            raise _fail(where, field, "empty response" if role == "assistant" else f"empty {role} turn")
        if role == "assistant" and not any(m["role"] == "user" for m in out):
            raise _fail(where, m.get("_role_field", field), "the conversation starts with an assistant turn (no prompt to answer)")
        out.append({"role": role, "content": content})
    last = max((i for i, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: no assistant turn (nothing to learn from)")
    return out[: last + 1]


# --------------------------------------------------------------------------- files

def iter_json_array(path: str | Path, truncated_ok: bool = False, chunk: int = 1 << 20) -> Iterator[tuple[int, object]]:
    """Yield (line, value) for each element of a top-level JSON list, reading it piece by piece.

    Memory holds one buffer (about a chunk), never the file: the 125 MB ShareGPT dump
    is read only as far as needed. With truncated_ok, a file cut off mid-record (that
    dump is) ends the iteration cleanly instead of raising.
    """
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as fh:
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
            raise DataError(f"{path}:{line_at(pos)}: expected a JSON list of objects")
        pos += 1
        while True:
            skip(" \t\r\n,")
            if pos >= len(buf):
                if truncated_ok:
                    return
                raise DataError(f"{path}:{line_at(pos)}: file ends before the closing ']'")
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
                raise DataError(f"{path}:{line_at(exc.pos)}: not valid JSON ({exc.msg})") from None
            yield line_at(pos), value
            pos = end


def _iter_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, row) per row; a row that cannot even be parsed comes as a DataError value."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for lineno, text in enumerate(fh, 1):
                if text.strip():
                    try:
                        yield f"{path}:{lineno}", json.loads(text)
                    except json.JSONDecodeError as exc:
                        yield f"{path}:{lineno}", DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})")
    elif suffix == ".json":
        with open(path, encoding="utf-8") as fh:
            first = fh.read(4096).lstrip()[:1]
        if first == "{":  # {"data": [...]}: small enough to load whole
            with open(path, encoding="utf-8") as fh:
                try:
                    obj = json.load(fh)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj.get("data"), list):
                raise DataError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}, found keys {sorted(obj)}")
            for i, row in enumerate(obj["data"]):
                yield f"{path}:data[{i}]", row
        else:
            for lineno, row in iter_json_array(path):
                yield f"{path}:{lineno}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path}:row {i}", row
                i += 1
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (expected .jsonl, .json or .parquet)")


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield (where, row) for every row of a .jsonl / .json / .parquet file; bad JSON raises."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    for where, row in _iter_rows(path):
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def samples_from_rows(rows, source: str, fmt: str = "auto", on_error: str = "raise",
                      limit: int | None = None) -> tuple[list[Sample], dict]:
    """Normalise (where, row) pairs into unique Samples; the shared loop of every loader.

    stats: read, kept, skipped (with up to 5 example reasons), duplicates (identical content).
    `limit` stops after that many kept samples, so a big source is read only as far as needed.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    samples, seen = [], set()
    stats = {"read": 0, "kept": 0, "skipped": 0, "duplicates": 0, "skipped_reasons": []}
    for where, row in rows if limit is None or limit > 0 else ():
        stats["read"] += 1
        try:
            if isinstance(row, Exception):
                raise row
            messages = normalize_record(row, fmt, where)
        except DataError as exc:
            if on_error == "raise":
                raise
            stats["skipped"] += 1
            if len(stats["skipped_reasons"]) < 5:
                stats["skipped_reasons"].append(str(exc))
            continue
        sample = Sample.create(source, messages, {"origin": where})
        if sample.id in seen:
            stats["duplicates"] += 1
            continue
        seen.add(sample.id)
        samples.append(sample)
        if limit is not None and len(samples) >= limit:
            break
    stats["kept"] = len(samples)
    return samples, stats


def load_file(path: str | Path, source: str | None = None, fmt: str = "auto", on_error: str = "raise",
              limit: int | None = None) -> tuple[list[Sample], dict]:
    """Read a local data file into Samples (meta["origin"] = "file:line"); see samples_from_rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return samples_from_rows(_iter_rows(path), source or path.stem, fmt, on_error, limit)
