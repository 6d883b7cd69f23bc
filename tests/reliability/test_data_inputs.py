"""`ual data` on malformed data files of every supported format, driven through the CLI.

Each bad file is real, written into tmp_path. For each: a non-zero exit whose message names the
file, the line (or row) and the field; the input byte-for-byte unchanged; and no output of an
earlier run left beside the new config.yaml (each case starts from a folder holding real outputs
of a good run). Under `on_error: skip`, every kind of bad row is skipped and counted by kind; a
conversation that goes on after its last reply keeps its answered part and is counted.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from ual.cli import main
from ual.io import read_json, read_jsonl

STALE = ("samples.jsonl", "heldout.jsonl", "data_stats.json", "scores.jsonl", "smoothing.jsonl", "smoothing_stats.json")


def good(fmt: str, i: int) -> dict:
    q, a = f"Question number {i}?", f"Answer number {i}."
    return {
        "messages": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
        "sharegpt": {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        "alpaca": {"instruction": q, "input": "", "output": a},
        "prompt_completion": {"prompt": q, "completion": a},
        "lima": {"conversations": [q, a]},
    }[fmt]


def line(row) -> bytes:
    return row if isinstance(row, bytes) else json.dumps(row).encode()


def jsonl(*rows) -> bytes:
    return b"".join(line(r) + b"\n" for r in rows)


def json_list(*rows) -> bytes:
    """One element per line: element k (0-based) starts on line k + 2."""
    return b"[\n" + b",\n".join(line(r) for r in rows) + b"\n]\n"


def parquet(rows) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    schema = pa.schema([("instruction", pa.string()), ("input", pa.string()), ("output", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


def parquet_rows(rows) -> bytes:
    """A Parquet table of `rows`, its schema inferred (nested lists of structs, nulls)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def chat(*turns, **extra) -> dict:
    """{"messages": [...]} from (role, content) pairs, each a dict already or a pair."""
    return {"messages": [t if isinstance(t, dict) else {"role": t[0], "content": t[1]} for t in turns], **extra}


DEEP = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # deeper than any parser's recursion
LONG_INT = b'{"prompt": "q", "completion": "a", "n": ' + b"9" * 5000 + b"}"  # past Python's int digit limit


def ual(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def write_config(tmp_path, source, on_error="raise", model="smollm2-135m", **opts):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "model": str(model),
                                   "data": {"on_error": on_error, "sources": [{"name": str(source), **opts}]}}))
    return cfg


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tokenizer):
    """Real outputs of a good `ual data` + `ual map` run: what a failed rerun must not leave behind."""
    tmp = tmp_path_factory.mktemp("good")
    src = tmp / "good.jsonl"
    src.write_bytes(jsonl(*(good("messages", i) for i in range(8))))
    cfg = write_config(tmp, src, heldout=2)
    assert main(["data", str(cfg)]) == 0
    run = tmp / "run"
    ids = [r["id"] for r in read_jsonl(run / "samples.jsonl")]
    (run / "scores.jsonl").write_text("".join(json.dumps({"id": i, "score": (k + 1) / 8}) + "\n"
                                              for k, i in enumerate(ids)))
    assert main(["map", str(cfg)]) == 0
    assert all((run / name).exists() for name in STALE)
    return run


def seed_stale(good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    return run


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_untouched(run, good_run):
    """A failed rerun leaves the folder as it was: config.yaml and every output byte-identical (ual/lineage.py)."""
    before, after = snapshot(good_run), snapshot(run)
    changed = sorted(k for k in {**before, **after} if before.get(k) != after.get(k))
    assert not changed, f"a failed rerun changed the run folder: {changed}"


# --------------------------------------------------------------------------- fatal: exit 2, file, line, field

M, S, A, P, L = (good(f, 0) for f in ("messages", "sharegpt", "alpaca", "prompt_completion", "lima"))

# (case, file name, content, source options, fragments of the message; {f} is the file's path)
FATAL = [
    ("utf8-messages-jsonl", "m.jsonl",
     jsonl(M, b'{"messages": [{"role": "user", "content": "caf\xe9?"}, {"role": "assistant", "content": "oui"}]}'),
     {}, ["{f}:2: field 'messages[0].content': invalid UTF-8 byte 0xe9"]),
    ("utf8-alpaca-latin1", "a.jsonl", jsonl(A, json.dumps({"instruction": "Résumé?", "output": "ok"},
                                                          ensure_ascii=False).encode("latin-1")),
     {}, ["{f}:2: field 'instruction': invalid UTF-8 byte 0xe9"]),
    ("utf8-sharegpt-json-list", "s.json",
     json_list(S, good("sharegpt", 1), b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "\xff"}]}'),
     {}, ["{f}:4: field 'conversations[1].value': invalid UTF-8 byte 0xff"]),
    ("utf8-outside-a-string", "x.jsonl", jsonl(P, b'{"prompt": "a", "completion": "b"}\xff'),
     {}, ["{f}:2: invalid UTF-8 byte 0xff at column 35"]),
    ("empty-jsonl", "e.jsonl", b"", {}, ["{f}: empty file"]),
    ("blank-lines-jsonl", "b.jsonl", b"\n  \n\n", {}, ["{f}: no rows"]),
    ("empty-json-list", "e.json", b"[ ]\n", {}, ["{f}: no rows"]),
    ("empty-json-bytes", "e2.json", b"", {}, ["{f}: empty file"]),
    ("empty-parquet-table", "e.parquet", parquet([]), {}, ["{f}: no rows"]),
    ("empty-parquet-bytes", "e2.parquet", b"", {}, ["{f}: empty file"]),
    ("not-parquet", "n.parquet", b"instruction,output\nq,a\n", {}, ["{f}: not a readable Parquet file"]),
    ("bad-json-line", "j.jsonl", jsonl(M, b'{"messages": ['), {}, ["{f}:2: not valid JSON"]),
    ("bad-json-list", "j.json", json_list(A, b'{"instruction": "q" "output": "a"}'), {}, ["{f}:3: not valid JSON"]),
    ("row-not-an-object", "o.jsonl", jsonl(M, b"[1, 2]"), {}, ["{f}:2: expected a JSON object, got list"]),
    ("messages-content-int", "t.jsonl",
     jsonl(M, {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}),
     {}, ["{f}:2: field 'messages[0].content': expected a string, got int"]),
    ("messages-role-missing", "t.jsonl", jsonl(M, {"messages": [{"role": "user", "content": "q"}, {"content": "a"}]}),
     {}, ["{f}:2: field 'messages[1].role': missing"]),
    ("messages-content-missing", "t.jsonl",
     jsonl(M, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}),
     {}, ["{f}:2: field 'messages[1].content': missing"]),
    ("sharegpt-conversations-dict", "t.jsonl", jsonl(S, {"conversations": {"from": "human", "value": "q"}}),
     {}, ["{f}:2: field 'conversations': expected a list of turns, got dict"]),
    ("sharegpt-turn-not-object", "t.jsonl", jsonl(S, {"conversations": [{"from": "human", "value": "q"}, "a"]}),
     {}, ["{f}:2: field 'conversations[1]': expected an object"]),
    ("sharegpt-from-missing", "t.jsonl", jsonl(S, {"conversations": [{"from": "human", "value": "q"}, {"value": "a"}]}),
     {}, ["{f}:2: field 'conversations[1].from': missing"]),
    ("alpaca-output-list", "t.jsonl", jsonl(A, {"instruction": "q", "output": ["a"]}),
     {}, ["{f}:2: field 'output': expected a string, got list"]),
    ("alpaca-input-int", "t.jsonl", jsonl(A, {"instruction": "q", "input": 3, "output": "a"}),
     {}, ["{f}:2: field 'input': expected a string, got int"]),
    ("alpaca-output-missing", "t.jsonl", jsonl(A, {"instruction": "q", "input": "x"}), {"format": "alpaca"},
     ["{f}:2: field 'output': missing"]),
    ("prompt-completion-prompt-int", "t.jsonl", jsonl(P, {"prompt": 3, "completion": "c"}),
     {}, ["{f}:2: field 'prompt': expected a string, got int"]),
    ("lima-item-int", "t.jsonl", jsonl(L, {"conversations": ["q", 5]}), {"format": "lima"},
     ["{f}:2: field 'conversations[1]': expected a string, got int"]),
    ("lima-single-turn", "t.jsonl", jsonl(L, {"conversations": ["only a question"]}),
     {}, ["{f}:2: field 'conversations': no assistant turn"]),
    ("parquet-null-output", "p.parquet", parquet([A, {"instruction": "q", "input": None, "output": None}]),
     {"format": "alpaca"}, ["{f}:row 1: field 'output': missing"]),
    ("json-data-wrapper-wrong-type", "w.json", json.dumps({"data": [P, {"prompt": 1, "completion": "c"}]}).encode(),
     {}, ["{f}:data[1]: field 'prompt': expected a string, got int"]),
    ("unknown-shape", "t.jsonl", jsonl(M, {"question": "q", "reply": "r"}), {}, ["{f}:2: unknown format: found keys"]),
    ("unsupported-suffix", "t.csv", b"prompt,completion\nq,a\n", {}, ["{f}: unsupported file type '.csv'"]),
    ("every-row-bad-under-skip", "t.jsonl", jsonl(b"{oops", {"prompt": 1, "completion": "c"}), {"on_error": "skip"},
     ["{f}: none of its 2 rows is usable", "{f}:1: not valid JSON"]),
    # not UTF-8 JSON text at all: said once for the file, with what it is
    ("utf16-with-bom", "u.jsonl", jsonl(M, P).decode().encode("utf-16"), {},
     ["{f}: UTF-16 text (it starts with a byte-order mark), not UTF-8"]),
    ("utf16-without-bom", "u.json", json.dumps([M]).encode("utf-16-le"), {},
     ["{f}: NUL bytes among its first characters: UTF-16 or UTF-32 text without a byte-order mark"]),
    ("gzip-bytes-named-jsonl", "z.jsonl", __import__("gzip").compress(jsonl(M)), {}, ["{f}: gzip-compressed, not JSON text"]),
    ("jsonl-gz", "z.jsonl.gz", __import__("gzip").compress(jsonl(M)), {}, ["{f}: a gzip-compressed file: decompress it"]),
    ("parquet-named-json", "p.json", parquet([A]), {}, ["{f}: a Parquet file, not JSON text: give it the .parquet suffix"]),
    ("nul-bytes-line", "n.jsonl", jsonl(M, b"\x00" * 8), {}, ["{f}:2: NUL byte at column 1"]),
    # what the JSON parser raises besides a syntax error
    ("nested-too-deep-jsonl", "d.jsonl", jsonl(M, DEEP), {}, ["{f}:2: not readable JSON (lists or objects nested deeper"]),
    ("nested-too-deep-json-list", "d.json", json_list(M, P, DEEP), {},
     ["{f}:4: not readable JSON (lists or objects nested deeper", "a JSON list cannot be read past it"]),
    ("nested-too-deep-data-wrapper", "d.json", b'{"data": [' + DEEP + b"]}", {}, ["{f}: not readable JSON (lists or"]),
    ("integer-too-long", "i.jsonl", jsonl(P, LONG_INT), {}, ["{f}:2: not readable JSON (an integer with more than"]),
    # a key given twice: JSON would keep the last value and lose the other
    ("duplicate-key", "k.jsonl", jsonl(M, b'{"messages": [{"role": "user", "content": "q"}], "messages": "x"}'), {},
     ["{f}:2: field 'messages': key given twice in one object"]),
    ("duplicate-key-nested-json-list", "k.json",
     json_list(S, b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "value": "b"}]}'),
     {}, ["{f}:3: field 'conversations[1].value': key given twice in one object"]),
    ("duplicate-key-data-wrapper", "k.json", b'{"data": [{"prompt": "a", "completion": "b", "prompt": "c"}]}', {},
     ["{f}:data[0]: field 'prompt': key given twice in one object"]),
    # the file's layout is not the suffix's
    ("json-list-then-more", "l.json", json_list(M) + b"[]\n", {}, ["{f}:4: more text after the list's closing ']'"]),
    ("json-file-holding-json-lines", "l.json", jsonl(M, P), {},
     ["{f}:2: not valid JSON (Extra data at column 1)", "JSON Lines, read from a .jsonl file"]),
    ("jsonl-file-holding-a-json-list", "l.jsonl", json.dumps([M, P], indent=1).encode(), {},
     ["{f}:1: not valid JSON", "the file starts a JSON list: a list of rows is read from a .json file"]),
    ("jsonl-cut-off-mid-row", "c.jsonl", jsonl(M) + b'{"messages": [{"role": "user", "con', {},
     ["{f}:2: not valid JSON (Unterminated string starting at column 32)", "no line end: was the file cut off?"]),
    # turns that are not plain text
    ("content-null", "t.jsonl", jsonl(M, chat(("user", None), ("assistant", "a"))), {},
     ["{f}:2: field 'messages[0].content': expected a string, got null"]),
    ("content-image-part", "t.jsonl",
     jsonl(M, chat(("user", [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]),
                   ("assistant", "A cat."))), {},
     ["{f}:2: field 'messages[0].content[1].type': a part of type 'image_url': only text parts"]),
    ("content-part-not-an-object", "t.jsonl", jsonl(M, chat(("user", ["q"]), ("assistant", "a"))), {},
     ["{f}:2: field 'messages[0].content[0]': expected a text part", "got str"]),
    ("assistant-tool-call", "t.jsonl",
     jsonl(M, chat(("user", "Weather?"), {"role": "assistant", "content": None,
                                          "tool_calls": [{"id": "1", "type": "function",
                                                          "function": {"name": "weather", "arguments": "{}"}}]},
                   ("tool", "sunny"), ("assistant", "Sunny."))), {},
     ["{f}:2: field 'messages[1].tool_calls': a tool call: tool calls and their results are not supported"]),
    ("tool-role", "t.jsonl", jsonl(M, chat(("user", "q"), ("tool", "42"), ("assistant", "a"))), {},
     ["{f}:2: field 'messages[1].role': a tool-use turn ('tool')"]),
    ("sharegpt-function-call", "t.jsonl",
     jsonl(S, {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f()"},
                                 {"from": "observation", "value": "1"}, {"from": "gpt", "value": "a"}]}), {},
     ["{f}:2: field 'conversations[1].from': a tool-use turn ('function_call')"]),
    # a known field that is there but null
    ("messages-null", "t.jsonl", jsonl(M, {"messages": None}), {}, ["{f}:2: field 'messages': missing (null)"]),
    ("parquet-messages-null", "m.parquet", parquet_rows([M, {"messages": None}]), {},
     ["{f}:row 1: field 'messages': missing (null)"]),
    ("parquet-messages-content-null", "m.parquet",
     parquet_rows([M, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}]), {},
     ["{f}:row 1: field 'messages[1].content': expected a string, got null"]),
]


@pytest.mark.parametrize("name,content,opts,fragments", [c[1:] for c in FATAL], ids=[c[0] for c in FATAL])
def test_bad_file_is_a_clear_error(tmp_path, capsys, good_run, name, content, opts, fragments):
    src = tmp_path / "in" / name
    src.parent.mkdir()
    src.write_bytes(content)
    run = seed_stale(good_run, tmp_path)
    cfg = write_config(tmp_path, src, **opts)
    code, err = ual(capsys, "data", cfg)
    assert code == 2 and "Traceback" not in err
    [message] = [x for x in err.splitlines() if x.startswith("ual data: error: ")]  # one line says it all
    for fragment in fragments:
        assert fragment.format(f=src) in message
    assert src.read_bytes() == content
    assert_untouched(run, good_run)


@pytest.mark.parametrize("case", ["directory", "directory-named-jsonl", "missing-file"])
def test_a_path_that_is_not_a_file_says_what_it_is(tmp_path, capsys, good_run, case):
    path = tmp_path / {"directory": "chats", "directory-named-jsonl": "chats.jsonl", "missing-file": "gone.jsonl"}[case]
    if case != "missing-file":
        path.mkdir()
        (path / "part-0.jsonl").write_bytes(jsonl(M))
    run = seed_stale(good_run, tmp_path)
    code, err = ual(capsys, "data", write_config(tmp_path, path))
    assert code == 2
    assert f"{path}: {'no such file' if case == 'missing-file' else 'is a directory'}" in err
    if case != "missing-file":
        assert [p.name for p in path.iterdir()] == ["part-0.jsonl"] and (path / "part-0.jsonl").read_bytes() == jsonl(M)
    assert_untouched(run, good_run)


def test_a_symlink_loop_is_a_clear_error_and_leaves_the_folder_as_it_was(tmp_path, capsys, good_run):
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(tmp_path / "loop2.jsonl")
    (tmp_path / "loop2.jsonl").symlink_to(loop)
    run = seed_stale(good_run, tmp_path)
    code, err = ual(capsys, "data", write_config(tmp_path, loop))
    assert code == 2 and "Traceback" not in err
    assert f"{loop}: cannot read (Too many levels of symbolic links)" in err
    assert_untouched(run, good_run)


@pytest.mark.parametrize("how", ["same-path", "same-path-two-labels", "symlink-to-it"])
def test_one_file_given_as_two_sources_is_refused(tmp_path, capsys, good_run, how):
    src = tmp_path / "chat.jsonl"
    content = jsonl(*(good("messages", i) for i in range(8)))
    src.write_bytes(content)
    other = src
    if how == "symlink-to-it":
        other = tmp_path / "alias.jsonl"
        other.symlink_to(src)
    labels = ({"label": "a"}, {"label": "b"}) if how == "same-path-two-labels" else ({}, {"label": "b"})
    run = seed_stale(good_run, tmp_path)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(run), "model": "smollm2-135m", "data": {"sources": [
        {"name": str(src), "heldout": 2, **labels[0]}, {"name": str(other), "heldout": 2, **labels[1]}]}}))
    code, err = ual(capsys, "data", cfg)
    assert code == 2 and "Traceback" not in err
    assert "data.sources[0] and data.sources[1] both read" in err and str(src) in err
    assert src.read_bytes() == content
    assert_untouched(run, good_run)


def test_overlapping_files_never_train_on_a_held_out_conversation(tmp_path, capsys, caplog):
    """Two files that share conversations: one source's held-out samples are dropped from the other's
    training (and counted), so evaluation never runs on what was trained on; a conversation both train
    on is trained once, as the earlier source's."""
    small, big, third = tmp_path / "small.jsonl", tmp_path / "big.jsonl", tmp_path / "third.jsonl"
    small.write_bytes(jsonl(*(good("messages", i) for i in range(4))))
    big.write_bytes(jsonl(*(good("messages", i) for i in range(8))))
    third.write_bytes(jsonl(*(good("messages", i) for i in range(6, 10))))  # 6, 7 also in big's training
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "model": "smollm2-135m", "data": {"sources": [
        {"name": str(small), "heldout": 4}, {"name": str(big)}, {"name": str(third)}]}}))
    code, err = ual(capsys, "data", cfg)
    assert code == 0, err
    run = tmp_path / "run"
    held = {json.dumps(r["messages"]) for r in read_jsonl(run / "heldout.jsonl")}
    train = [json.dumps(r["messages"]) for r in read_jsonl(run / "samples.jsonl")]
    assert len(held) == 4 and len(train) == 6 == len(set(train)) and not held & set(train)
    stats = read_json(run / "data_stats.json")
    assert stats["sources"]["big"]["dropped_also_heldout"] == 4 and stats["sources"]["big"]["train"] == 4
    assert stats["sources"]["third"]["dropped_trained_by_another_source"] == 2 and stats["sources"]["third"]["train"] == 2
    assert stats["train"] == 6
    assert "held-out samples of another source" in caplog.text and "trained once" in caplog.text


# --------------------------------------------------------------------------- on_error: skip counts every kind

SKIP = [
    ("jsonl", "mixed.jsonl", {}, jsonl(
        M, good("messages", 1), good("messages", 2),
        b'{"messages": [{"role": "user", "content": "\xe9"}, {"role": "assistant", "content": "a"}]}',
        b'{"messages": [',
        b'"just a string"',
        {"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"content": "a"}]},
        {"question": "q"},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
    ), {"invalid UTF-8": 1, "invalid JSON": 1, "not an object": 1, "wrong type": 1, "missing field": 1,
        "unknown format": 1, "no assistant turn": 1, "empty turn": 1}),
    ("json-list", "mixed.json", {}, json_list(
        S, good("sharegpt", 1), good("sharegpt", 2),
        b'{"conversations": [{"from": "human", "value": "\xff"}, {"from": "gpt", "value": "a"}]}',
        {"conversations": [{"from": "wizard", "value": "q"}, {"from": "gpt", "value": "a"}]},
        7,
    ), {"invalid UTF-8": 1, "unknown role": 1, "not an object": 1}),
    ("parquet", "mixed.parquet", {"format": "alpaca"}, parquet(
        [A, good("alpaca", 1), good("alpaca", 2), {"instruction": "q", "input": None, "output": None},
         {"instruction": "q", "input": None, "output": ""}]), {"missing field": 1, "empty turn": 1}),
    ("lima", "mixed.jsonl", {"format": "lima"}, jsonl(
        L, good("lima", 1), good("lima", 2), {"conversations": ["q", 3]}, {"conversations": "q"},
        {"conversations": ["a reply first?", ""]}), {"wrong type": 2, "empty turn": 1}),
    ("jsonl-parser-limits-and-non-text", "mixed2.jsonl", {}, jsonl(
        M, good("messages", 1), good("messages", 2), DEEP, LONG_INT,
        b'{"prompt": "q", "completion": "a", "completion": "b"}',
        chat(("user", "q"), ("tool", "1"), ("assistant", "a")),
        chat(("user", [{"type": "image_url", "image_url": {"url": "x"}}]), ("assistant", "a")),
        {"messages": None},
    ), {"invalid JSON": 2, "duplicate key": 1, "tool use": 1, "not text": 1, "missing field": 1}),
    ("json-list-duplicate-key", "mixed2.json", {}, json_list(
        P, good("prompt_completion", 1), b'{"prompt": "q", "prompt": "q2", "completion": "c"}',
        good("prompt_completion", 2)), {"duplicate key": 1}),
]


@pytest.mark.parametrize("name,opts,content,kinds", [c[1:] for c in SKIP], ids=[c[0] for c in SKIP])
def test_skip_mode_skips_and_counts_every_kind_of_bad_row(tmp_path, capsys, caplog, name, opts, content, kinds):
    src = tmp_path / name
    src.write_bytes(content)
    code, err = ual(capsys, "data", write_config(tmp_path, src, on_error="skip", **opts))
    assert code == 0, err
    stats = read_json(tmp_path / "run" / "data_stats.json")["sources"][src.stem]
    assert stats["kept"] == 3 and stats["skipped"] == sum(kinds.values())
    assert stats["skipped_by_kind"] == kinds
    assert all(r.startswith(f"{src}:") for r in stats["skipped_reasons"])
    assert len(read_jsonl(tmp_path / "run" / "samples.jsonl")) == 3
    assert f"{sum(kinds.values())} bad rows skipped" in caplog.text
    assert src.read_bytes() == content


# --------------------------------------------------------------------------- shapes accepted as they are written

def test_common_variants_are_accepted_as_written(tmp_path, capsys):
    """Content as a list of text parts, OpenAI's developer role, roles in any case, an Alpaca row with
    its question in `input` only, and a NaN / Infinity weight (Python's JSON reads them; not carried,
    so samples.jsonl stays strict JSON)."""
    src = tmp_path / "variants.jsonl"
    content = jsonl(
        chat(("user", [{"type": "text", "text": "Look:"}, {"type": "text", "text": "what is it?"}]),
             ("assistant", [{"type": "text", "text": "A cat."}])),
        chat(("developer", "Be brief."), ("User", "Hi"), ("ASSISTANT", "Hello.")),
        {"instruction": "", "input": "Translate 'chat'.", "output": "cat"},
        b'{"prompt": "q1", "completion": "a1", "weight": NaN, "w2": Infinity, "w3": 2.5}',
    )
    src.write_bytes(content)
    code, err = ual(capsys, "data", write_config(tmp_path, src))
    assert code == 0, err
    run = tmp_path / "run"
    text = (run / "samples.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rows = {r["meta"]["origin"].rsplit(":", 1)[1]: r for r in read_jsonl(run / "samples.jsonl")}
    assert rows["1"]["messages"] == [{"role": "user", "content": "Look:\nwhat is it?"},
                                     {"role": "assistant", "content": "A cat."}]
    assert [m["role"] for m in rows["2"]["messages"]] == ["system", "user", "assistant"]
    assert rows["3"]["messages"][0] == {"role": "user", "content": "Translate 'chat'."}
    assert "weight" not in rows["4"]["meta"] and "w2" not in rows["4"]["meta"] and rows["4"]["meta"]["w3"] == 2.5
    assert src.read_bytes() == content


@pytest.fixture(scope="module")
def strict_template_model(tmp_path_factory, tokenizer):
    """SmolLM2's tokenizer with a template that raises on turns that do not alternate, as Llama-2's
    and Mistral's do."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                         "{% endif %}{% endfor %}" + tokenizer.chat_template)
    path = tmp_path_factory.mktemp("strict-template")
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_conversation_the_chat_template_refuses_names_its_line(tmp_path, capsys, good_run, strict_template_model,
                                                                 on_error):
    src = tmp_path / "chat.jsonl"
    content = jsonl(*(good("messages", i) for i in range(3)),
                    chat(("user", "q1"), ("user", "q2"), ("assistant", "a")))
    src.write_bytes(content)
    run = seed_stale(good_run, tmp_path)
    code, err = ual(capsys, "data", write_config(tmp_path, src, on_error=on_error, model=strict_template_model))
    assert "Traceback" not in err and src.read_bytes() == content
    if on_error == "raise":
        assert code == 2
        [message] = [x for x in err.splitlines() if x.startswith("ual data: error: ")]
        assert f"{src}:4: the chat template of" in message and "Conversation roles must alternate" in message
        assert_untouched(run, good_run)
    else:
        assert code == 0, err
        stats = read_json(run / "data_stats.json")["sources"]["chat"]
        assert stats["kept"] == 3 and stats["skipped"] == 1 and stats["skipped_by_kind"] == {"chat template": 1}
        assert stats["skipped_reasons"][0].startswith(f"{src}:4: the chat template of")
        assert len(read_jsonl(run / "samples.jsonl")) == 3


# --------------------------------------------------------------------------- turns after the last reply

TRAILING = [
    ("messages-ends-with-user", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                              {"role": "user", "content": "and then?"}]}),
    ("sharegpt-ends-with-human", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                                                    {"from": "human", "value": "thanks"}]}),
    ("lima-odd-length", {"conversations": ["q", "a", "a last question nobody answered"]}),
]


@pytest.mark.parametrize("row", [c[1] for c in TRAILING], ids=[c[0] for c in TRAILING])
def test_turns_after_the_last_reply_are_dropped_and_counted(tmp_path, capsys, caplog, row):
    src = tmp_path / "chat.jsonl"
    content = jsonl(good("messages", 1), row)
    src.write_bytes(content)
    code, err = ual(capsys, "data", write_config(tmp_path, src))
    assert code == 0, err
    stats = read_json(tmp_path / "run" / "data_stats.json")["sources"]["chat"]
    assert stats["kept"] == 2 and stats["trailing_turns_dropped"] == 1
    assert stats["trailing_turns_examples"] == [f"{src}:2: 1 turn after the last reply"]
    assert "trailing turns were dropped" in caplog.text and f"{src}:2" in caplog.text
    kept = next(s for s in read_jsonl(tmp_path / "run" / "samples.jsonl") if s["meta"]["origin"] == f"{src}:2")
    assert [m["role"] for m in kept["messages"]] == ["user", "assistant"]
    assert src.read_bytes() == content


# --------------------------------------------------------------------------- the run folder after a failed rerun

def test_failed_rerun_leaves_the_folder_as_it_was(tmp_path, capsys, good_run):
    """Settings are recorded only when a stage succeeds: a rerun that fails, on its data or on its tokenizer,
    leaves config.yaml, the samples and everything derived from them (scores, smoothing) byte-identical."""
    run = seed_stale(good_run, tmp_path)
    src = tmp_path / "good.jsonl"
    src.write_bytes(jsonl(*(good("messages", i) for i in range(8))))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(M, {"instruction": "x"}))
    code, err = ual(capsys, "data", write_config(tmp_path, bad))
    assert code == 2 and f"{bad}:2" in err
    assert_untouched(run, good_run)
    # a model whose tokenizer cannot load fails before any data is read
    empty_model = tmp_path / "no-model"
    empty_model.mkdir()
    try:
        code = main(["data", str(write_config(tmp_path, src, model=empty_model, heldout=2))])
    except Exception:  # noqa: BLE001 - how the tokenizer's failure surfaces is not this test's business
        code = 1
    assert code != 0
    assert_untouched(run, good_run)
    # the same config as the good run rebuilds the same samples, and keeps the scores and smoothing made from them
    assert ual(capsys, "data", write_config(tmp_path, src, heldout=2))[0] == 0
    assert [r["id"] for r in read_jsonl(run / "samples.jsonl")] == [r["id"] for r in read_jsonl(good_run / "samples.jsonl")]
    assert (run / "smoothing.jsonl").read_bytes() == (good_run / "smoothing.jsonl").read_bytes()
    # other samples: the scores and smoothing that name the old ones by id go, once the new samples are in place
    assert ual(capsys, "data", write_config(tmp_path, src, heldout=3))[0] == 0
    assert not any((run / n).exists() for n in ("scores.jsonl", "smoothing.jsonl", "smoothing_stats.json"))
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["sources"][0]["heldout"] == 3


def test_a_source_that_is_an_output_is_refused_and_kept(tmp_path, capsys, good_run):
    run = seed_stale(good_run, tmp_path)
    content = (run / "samples.jsonl").read_bytes()
    code, err = ual(capsys, "data", write_config(tmp_path, run / "samples.jsonl"))
    assert code == 2 and "is also an output of `ual data`" in err
    assert (run / "samples.jsonl").read_bytes() == content
    assert_untouched(run, good_run)
