"""Row shapes people store chat data in, normalised to one: a list of chat messages.

Supported shapes (`detect_format` picks one per row; a source may force one):
  messages           {"messages": [{"role": "user", "content": "..."}, ...]}   (OpenAI chat)
  sharegpt           {"conversations": [{"from": "human", "value": "..."}, ...]}
  alpaca             {"instruction": ..., "input": ..., "output": ...}
  prompt_completion  {"prompt": ..., "completion": ...}  (or "response"; strings or message lists)
  lima               {"conversations": ["user turn", "assistant turn", ...]}

Every problem is a `DataError` naming the file, the line (or row) and the field, so a
user can open the file at the right place: "train.jsonl:7: field 'conversations[2].value':
empty response". Files are read by `files.iter_rows` (file and text problems); this module
checks each row's shape and fields. `load_file(..., on_error="skip")` skips every kind of
bad row and counts it (by kind) instead.

Accepted beyond the plain shapes: roles and speaker names in any case ("User", "ASSISTANT");
OpenAI's "developer" role as the system turn; a turn's content given as a list of text parts
([{"type": "text", "text": ...}], OpenAI's multimodal form; "input_text" / "output_text" too),
joined with newlines. Refused, naming the field: a part that is not text (an image, audio),
and tool use (a "tool" / "function" turn, an assistant turn with `tool_calls`), which has no
text turn to train on in place of the call.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterator

from ual.data.files import DataError, iter_json_array, iter_rows, read_records  # noqa: F401 (re-exported)
from ual.sample import Sample
from ual.jsonl import type_name

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "lima")
SHAPES = ("messages [{role, content}], sharegpt conversations [{from, value}], "
          "alpaca {instruction, input, output}, prompt_completion {prompt, completion|response}, "
          "lima conversations [str, str, ...]")

# ShareGPT speaker names seen in the wild -> chat roles.
SPEAKERS = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant", "bot": "assistant", "claude": "assistant",
    "system": "system", "developer": "system",
}
# Turns of tool use (OpenAI's tool/function roles, ShareGPT-style function_call/observation):
# a chat of plain text turns cannot hold them.
TOOL_SPEAKERS = ("tool", "function", "ipython", "function_call", "function_response", "observation",
                 "tool_call", "tool_calls", "tool_response")
TEXT_PARTS = ("text", "input_text", "output_text")



def _fail(where: str, field: str | None, msg: str, kind: str = "wrong type") -> DataError:
    return DataError(f"{where}: field '{field}': {msg}" if field else f"{where}: {msg}", kind)


# --------------------------------------------------------------------------- shapes

def _has(row: dict, key: str) -> bool:
    return row.get(key) is not None  # Parquet rows carry absent columns as None


def detect_format(row: dict) -> str:
    """Name the shape of one row, or raise listing the keys found and the shapes known."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object per row, got {type_name(row)}", "not an object")
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
    nulls = [k for k in ("messages", "conversations", "instruction", "output", "prompt", "completion", "response")
             if k in row and row[k] is None]
    if nulls:  # a known field that is there but null (a Parquet table's empty cell): say which
        raise DataError(f"field '{nulls[0]}': missing (null)", "missing field")
    raise DataError(f"unknown format: found keys {sorted(row)}; supported shapes: {SHAPES}", "unknown format")


def _turns(turns, field: str, where: str, speaker_key: str, text_key: str) -> list[dict]:
    """Turn dicts -> messages. Accepts role/content and from/value alike, names fields as given."""
    if not isinstance(turns, list):
        raise _fail(where, field, f"expected a list of turns, got {type_name(turns)}")
    out = []
    for i, t in enumerate(turns):
        f = f"{field}[{i}]"
        if not isinstance(t, dict):
            raise _fail(where, f, f"expected an object with '{speaker_key}' and '{text_key}', got {type_name(t)}")
        sk = speaker_key if speaker_key in t else ("role" if "role" in t else "from")
        tk = text_key if text_key in t else ("content" if "content" in t else "value")
        if sk not in t:
            raise _fail(where, f"{f}.{speaker_key}", "missing", "missing field")
        if tk not in t:
            raise _fail(where, f"{f}.{text_key}", "missing", "missing field")
        speaker = t[sk]
        role = SPEAKERS.get(speaker.strip().lower()) if isinstance(speaker, str) else None
        if role is None and isinstance(speaker, str) and speaker.strip().lower() in TOOL_SPEAKERS:
            raise _fail(where, f"{f}.{sk}", f"a tool-use turn ({speaker!r}): tool calls and their results are "
                        "not supported (only system, user and assistant text turns)", "tool use")
        if role is None:
            raise _fail(where, f"{f}.{sk}", f"unknown role {speaker!r} (expected one of {sorted(SPEAKERS)})",
                        "unknown role")
        for key in ("tool_calls", "function_call"):
            if t.get(key):
                raise _fail(where, f"{f}.{key}", "a tool call: tool calls and their results are not supported "
                            "(only system, user and assistant text turns)", "tool use")
        out.append({"role": role, "content": t[tk], "_field": f"{f}.{tk}", "_role_field": f"{f}.{sk}"})
    return out


def _string(value, field: str, where: str) -> str:
    if value is None:
        raise _fail(where, field, "missing", "missing field")
    if not isinstance(value, str):
        raise _fail(where, field, f"expected a string, got {type_name(value)}")
    return value


def _text(row: dict, key: str, where: str) -> str:
    return _string(row.get(key), key, where)


def _content(content, field: str, where: str) -> str:
    """A turn's text: a string, or a list of text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _fail(where, field, f"expected a string, got {type_name(content)}")
    return "\n".join(_text_part(part, f"{field}[{k}]", where) for k, part in enumerate(content))


def _text_part(part, field: str, where: str) -> str:
    """The text of one content part ({"type": "text", "text": ...}; no type means text)."""
    if not isinstance(part, dict):
        raise _fail(where, field, f"expected a text part {{\"type\": \"text\", \"text\": ...}}, got {type_name(part)}")
    kind = part.get("type", "text")
    if kind not in TEXT_PARTS:
        raise _fail(where, f"{field}.type", f"a part of type {kind!r}: only text parts can be trained on", "not text")
    return _string(part.get("text"), f"{field}.text", where)


def _alpaca(row: dict, where: str) -> list[dict]:
    prompt = _text(row, "instruction", where)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise _fail(where, "input", f"expected a string, got {type_name(extra)}")
    if extra and extra.strip():
        prompt = f"{prompt}\n\n{extra}" if prompt.strip() else extra  # the input alone when no instruction
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
        raise _fail(where, "conversations", f"expected a list of strings, got {type_name(conv)}")
    return [{"role": ("user", "assistant")[i % 2], "content": t, "_field": f"conversations[{i}]"}
            for i, t in enumerate(conv)]


def normalize_record(row: dict, fmt: str = "auto", where: str = "row") -> list[dict]:
    """One row -> validated chat messages [{"role", "content"}], or a DataError saying why not.

    Rules: contents are strings; no empty user or assistant turn (an empty system turn is
    dropped, there is nothing to render); the first non-system turn is the user's; at least
    one assistant turn; turns after the last assistant reply are dropped (nothing in them
    would be supervised; `normalize_row` says how many, and the loaders count them).
    """
    return normalize_row(row, fmt, where)[0]


def normalize_row(row: dict, fmt: str = "auto", where: str = "row") -> tuple[list[dict], int]:
    """normalize_record, and the number of trailing turns (after the last reply) it dropped."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type_name(row)}", "not an object")
    if fmt == "auto":
        try:
            fmt = detect_format(row)
        except DataError as exc:
            raise DataError(f"{where}: {exc}", exc.kind) from None
    field = {"messages": "messages", "sharegpt": "conversations", "lima": "conversations"}.get(fmt)
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
        raise DataError(f"{where}: unknown format '{fmt}' (expected auto or one of {', '.join(FORMATS)})", "file")
    return _validate(msgs, where, field)


def _validate(msgs: list[dict], where: str, field: str | None) -> tuple[list[dict], int]:
    out = []
    for m in msgs:
        role, f = m["role"], m["_field"]
        content = _content(m["content"], f, where)
        if not content.strip():
            if role == "system":
                continue
            raise _fail(where, f, "empty response" if role == "assistant" else f"empty {role} turn", "empty turn")
        if role == "assistant" and not any(m["role"] == "user" for m in out):
            raise _fail(where, m.get("_role_field", f), "the conversation starts with an assistant turn "
                        "(no prompt to answer)", "starts with assistant")
        out.append({"role": role, "content": content})
    last = max((i for i, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        raise _fail(where, field, "no assistant turn (nothing to learn from)", "no assistant turn")
    return out[: last + 1], len(out) - last - 1


def numeric_columns(row: dict) -> dict:
    """A row's top-level finite numbers (not booleans), e.g. a per-sample loss weight: carried into the
    sample's meta, where train.weight_column finds them (the keys ual sets itself win). NaN and
    infinities (Python's JSON reads them, a Parquet float column holds NaN for a missing value) are
    not carried, as a null is not: samples.jsonl stays strict JSON."""
    return {k: v for k, v in row.items() if isinstance(k, str) and isinstance(v, (int, float))
            and not isinstance(v, bool) and _finite(v)}


def _finite(v: float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer past any float: not a usable number either
        return False


def samples_from_rows(rows, source: str, fmt: str = "auto", on_error: str = "raise",
                      limit: int | None = None, name: str | None = None) -> tuple[list[Sample], dict]:
    """Normalise (where, row) pairs into unique Samples: `iter_samples`, kept in a list."""
    stats = new_stats()
    return list(iter_samples(rows, source, fmt, on_error, limit, name, stats)), stats


def new_stats() -> dict:
    return {"read": 0, "kept": 0, "skipped": 0, "skipped_by_kind": {}, "duplicates": 0, "skipped_reasons": [],
            "trailing_turns_dropped": 0, "trailing_turns_examples": []}


def iter_samples(rows, source: str, fmt: str = "auto", on_error: str = "raise", limit: int | None = None,
                 name: str | None = None, stats: dict | None = None) -> Iterator[Sample]:
    """Normalise (where, row) pairs into unique Samples, one at a time; the shared loop of every loader.

    A row may be a DataError (a reader's verdict on a row it could not parse): under
    on_error "skip" it is skipped and counted like a row with a bad field.
    Each sample's meta holds the row's numeric columns (`numeric_columns`) and "origin".
    `stats` (new_stats(); complete once the iterator is exhausted): read, kept, skipped (by kind,
    with up to 5 example reasons), duplicates (identical content), trailing_turns_dropped
    (conversations whose turns after the last reply, e.g. an unanswered user turn or the odd last
    string of a LIMA list, were cut; up to 5 examples). `limit` stops after that many kept samples,
    so a big source is read only as far as needed. A source with rows but no usable one is an error
    naming `name`. Only the ids seen are held (to drop duplicates), never the samples.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"{name or source}: unknown format '{fmt}' (expected auto or one of {', '.join(FORMATS)})",
                        "file")
    stats = new_stats() if stats is None else stats
    seen: set[int] = set()  # ids as numbers (16 hex digits): no string kept a sample
    for where, row in rows if limit is None or limit > 0 else ():
        stats["read"] += 1
        try:
            if isinstance(row, Exception):
                raise row
            messages, cut = normalize_row(row, fmt, where)
        except DataError as exc:
            if on_error == "raise":
                raise
            count_skipped(stats, exc)
            continue
        if cut:
            stats["trailing_turns_dropped"] += 1
            if len(stats["trailing_turns_examples"]) < 5:
                stats["trailing_turns_examples"].append(f"{where}: {cut} turn{'s' * (cut > 1)} after the last reply")
        sample = Sample.create(source, messages, {**numeric_columns(row), "origin": where})
        key = int(sample.id, 16)
        if key in seen:
            stats["duplicates"] += 1
            continue
        seen.add(key)
        stats["kept"] += 1
        yield sample
        if limit is not None and stats["kept"] >= limit:
            break
    if stats["read"] and not stats["kept"]:
        raise DataError(f"{name or source}: none of its {stats['read']} rows is usable (all skipped; first: "
                        f"{stats['skipped_reasons'][0]})", "file")


def count_skipped(stats: dict, exc: DataError) -> None:
    """Count a row left out under on_error: skip, by kind, keeping the first five reasons."""
    stats["skipped"] = stats.get("skipped", 0) + 1
    by_kind = stats.setdefault("skipped_by_kind", {})
    by_kind[exc.kind] = by_kind.get(exc.kind, 0) + 1
    reasons = stats.setdefault("skipped_reasons", [])
    if len(reasons) < 5:
        reasons.append(str(exc))


def load_file(path: str | Path, source: str | None = None, fmt: str = "auto", on_error: str = "raise",
              limit: int | None = None) -> tuple[list[Sample], dict]:
    """Read a local data file into Samples (meta["origin"] = "file:line"); see iter_samples."""
    path = Path(path)
    return samples_from_rows(iter_rows(path), source or path.stem, fmt, on_error, limit, name=str(path))


def stream_file(path: str | Path, source: str | None = None, fmt: str = "auto",
                on_error: str = "raise") -> tuple[Iterator[Sample], dict]:
    """load_file one sample at a time: (samples, stats complete once they are read)."""
    path, stats = Path(path), new_stats()
    return iter_samples(iter_rows(path), source or path.stem, fmt, on_error, None, str(path), stats), stats


def sharegpt_first_parts(path: Path, counts: dict) -> Iterator[tuple[str, object]]:
    """(where, row) for each conversation of a ShareGPT dump (a JSON list, perhaps cut off) that is
    not a later part of an earlier one: ids "abc_1", "abc_2" continue "abc". Those mostly start
    mid-conversation, and parts of one conversation on both sides of the train/held-out split would
    leak. counts["other_parts"] counts the parts left out."""
    seen = set()
    counts.setdefault("other_parts", 0)
    for line, row in iter_json_array(path, truncated_ok=True):
        rid = str(row.get("id", "")) if isinstance(row, dict) else ""
        base = rid.rsplit("_", 1)[0] if re.search(r"_\d+$", rid) else rid
        if base and base in seen:
            counts["other_parts"] += 1
            continue
        seen.add(base)
        yield f"{path.name}:{line}", row
