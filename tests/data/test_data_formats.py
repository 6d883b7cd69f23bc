"""Row shapes, file readers and bad input: real files written into tmp_path."""

from __future__ import annotations

import json
import re

import pytest

from ual.data.formats import DataError, detect_format, iter_json_array, load_file, normalize_record, read_records

U, A = "user", "assistant"

SHAPES = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": U, "content": "Hi"},
                              {"role": A, "content": "Hello!"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
                                   {"from": "human", "value": "and 3+3?"}, {"from": "chatgpt", "value": "6"}]},
    "alpaca": {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    "prompt_completion": {"prompt": "Name a colour.", "completion": "Blue."},
    "lima": {"conversations": ["Write a haiku.", "Leaves fall / ...", "Another?", "Snow melts / ..."]},
}

EXPECTED = {
    "messages": [{"role": "system", "content": "Be brief."}, {"role": U, "content": "Hi"}, {"role": A, "content": "Hello!"}],
    "sharegpt": [{"role": U, "content": "2+2?"}, {"role": A, "content": "4"},
                 {"role": U, "content": "and 3+3?"}, {"role": A, "content": "6"}],
    "alpaca": [{"role": U, "content": "Translate to French.\n\ncat"}, {"role": A, "content": "chat"}],
    "prompt_completion": [{"role": U, "content": "Name a colour."}, {"role": A, "content": "Blue."}],
    "lima": [{"role": U, "content": "Write a haiku."}, {"role": A, "content": "Leaves fall / ..."},
             {"role": U, "content": "Another?"}, {"role": A, "content": "Snow melts / ..."}],
}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", list(SHAPES))
def test_each_shape_is_detected_and_normalised(fmt):
    assert detect_format(SHAPES[fmt]) == fmt
    assert normalize_record(SHAPES[fmt]) == EXPECTED[fmt]
    assert normalize_record(SHAPES[fmt], fmt=fmt) == EXPECTED[fmt]


def test_shape_variants():
    assert normalize_record({"instruction": "Say hi.", "input": "", "output": "hi"})[0]["content"] == "Say hi."
    assert normalize_record({"prompt": "Q", "response": "R"})[1] == {"role": A, "content": "R"}
    conv = {"conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "Q"},
                              {"from": "bing", "value": "R1"}, {"from": "human", "value": "Q2"},
                              {"from": "bard", "value": "R2"}]}
    assert [m["role"] for m in normalize_record(conv)] == ["system", U, A, U, A]
    # TRL's conversational prompt/completion
    row = {"prompt": [{"role": U, "content": "Q"}], "completion": [{"role": A, "content": "R"}]}
    assert normalize_record(row) == [{"role": U, "content": "Q"}, {"role": A, "content": "R"}]
    # a trailing user turn has nothing to supervise and is dropped; an empty system turn too
    row = {"messages": [{"role": "system", "content": ""}, {"role": U, "content": "Q"},
                        {"role": A, "content": "R"}, {"role": U, "content": "thanks"}]}
    assert normalize_record(row) == [{"role": U, "content": "Q"}, {"role": A, "content": "R"}]


BAD = [
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                        {"from": "gpt", "value": "  "}]}, "field 'conversations[2].value': empty response"),
    ({"instruction": "x", "output": 3}, "field 'output': expected a string, got int"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]},
     "field 'messages[1].role': unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": "x"}, {"content": "y"}]}, "field 'messages[1].role': missing"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
    ({"conversations": [{"from": "gpt", "value": "answer first"}]},
     "field 'conversations[0].from': the conversation starts with an assistant turn"),
    ({"conversations": ["q", ""]}, "field 'conversations[1]': empty response"),
    ({"prompt": "", "completion": "c"}, "field 'prompt': empty user turn"),
    ({"question": "q", "reply": "r"}, "unknown format: found keys ['question', 'reply']; supported shapes: messages"),
]


@pytest.mark.parametrize("row,message", BAD)
def test_malformed_row_names_file_line_and_field(tmp_path, row, message):
    good = SHAPES["alpaca"]
    path = write_jsonl(tmp_path / "train.jsonl", [good, good | {"output": "chien"}, "", row, good])
    with pytest.raises(DataError) as err:
        load_file(path)
    assert str(err.value).startswith(f"{path}:4: ")  # line 3 is blank, still counted
    assert message in str(err.value)


def test_bad_json_line_and_non_object(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [SHAPES["lima"], '{"messages": [', SHAPES["alpaca"]])
    with pytest.raises(DataError, match=r"t\.jsonl:2: not valid JSON"):
        list(read_records(path))
    with pytest.raises(DataError, match=r"t\.jsonl:2: not valid JSON"):
        load_file(path)
    path = write_jsonl(tmp_path / "u.jsonl", [SHAPES["lima"], "[1, 2]"])
    with pytest.raises(DataError, match=r"u\.jsonl:2: expected a JSON object, got list"):
        load_file(path)


def test_unknown_format_name_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [SHAPES["alpaca"]])
    with pytest.raises(DataError, match="unknown format 'chatml'"):
        load_file(path, fmt="chatml")
    with pytest.raises(DataError, match="no such file"):
        load_file(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        (tmp_path / "t.csv").write_text("a,b\n")
        load_file(tmp_path / "t.csv")


def test_skip_mode_counts_bad_rows(tmp_path):
    rows = [SHAPES["alpaca"], BAD[0][0], "{oops", SHAPES["lima"], BAD[1][0], SHAPES["alpaca"], SHAPES["messages"]]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    samples, stats = load_file(path, on_error="skip")
    assert [s.meta["origin"] for s in samples] == [f"{path}:1", f"{path}:4", f"{path}:7"]
    assert {s.source for s in samples} == {"mixed"}
    assert stats["read"] == 7 and stats["kept"] == 3 and stats["skipped"] == 3 and stats["duplicates"] == 1
    assert any(":2: field 'conversations[2].value': empty response" in r for r in stats["skipped_reasons"])
    assert any(":3: not valid JSON" in r for r in stats["skipped_reasons"])


def test_json_list_with_line_numbers_and_data_wrapper(tmp_path):
    rows = [SHAPES[f] for f in SHAPES]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    samples, stats = load_file(path, source="mine")
    assert [s.messages for s in samples] == [EXPECTED[f] for f in SHAPES]
    lines = path.read_text().splitlines()
    for s in samples:  # the origin line is where the record's "{" is
        assert lines[int(s.meta["origin"].rsplit(":", 1)[1]) - 1].strip() == "{"
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": rows}), encoding="utf-8")
    assert [s.messages for s in load_file(wrapped)[0]] == [EXPECTED[f] for f in SHAPES]
    bad = tmp_path / "b.json"
    bad.write_text('[\n{"prompt": "a", "completion": "b"},\n{"prompt": "a" "completion": "b"}\n]')
    with pytest.raises(DataError, match=r"b\.json:3: not valid JSON"):
        load_file(bad)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "Add 2 and 2.", "input": None, "output": "4"},
            {"instruction": "Greet.", "input": "Bob", "output": "Hi Bob"},
            {"instruction": "Empty.", "input": "", "output": ""}]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"a\.parquet:row 2: field 'output': empty response"):
        load_file(path)
    samples, stats = load_file(path, on_error="skip")
    assert [s.messages[0]["content"] for s in samples] == ["Add 2 and 2.", "Greet.\n\nBob"]
    assert stats["skipped"] == 1


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_streaming_json_array_matches_json_load(tmp_path, chunk):
    rows = [{"i": i, "text": "é\n" * (i % 5) + '"quoted" [brackets], {braces}'} for i in range(40)] + [7, "s"]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    assert [v for _, v in iter_json_array(path, chunk=chunk)] == rows
    # cut off mid-record, as the packaged ShareGPT dump is
    text = path.read_text(encoding="utf-8")
    cut = tmp_path / "cut.json"
    cut.write_text(text[: text.index('"i": 30')], encoding="utf-8")
    assert [v for _, v in iter_json_array(cut, truncated_ok=True, chunk=chunk)] == rows[:30]
    with pytest.raises(DataError, match=r"cut\.json:\d+: not valid JSON"):
        list(iter_json_array(cut, chunk=chunk))


def test_content_given_as_text_parts(tmp_path):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "input_text", "text": "B"},
                                                       {"text": "C"}]},
                          {"role": "assistant", "content": [{"type": "output_text", "text": "R"}]}]}
    assert normalize_record(parts) == [{"role": U, "content": "A\nB\nC"}, {"role": A, "content": "R"}]
    row = {"prompt": [{"role": U, "content": [{"type": "text", "text": "Q"}]}], "completion": "R"}
    assert normalize_record(row) == [{"role": U, "content": "Q"}, {"role": A, "content": "R"}]
    for content, message, kind in [
        ([{"type": "image_url", "image_url": {"url": "x"}}], r"messages\[0\]\.content\[0\]\.type': a part of type 'image_url'", "not text"),
        ([{"type": "text"}], r"messages\[0\]\.content\[0\]\.text': missing", "missing field"),
        ([{"type": "text", "text": 3}], r"messages\[0\]\.content\[0\]\.text': expected a string, got int", "wrong type"),
        ([None], r"messages\[0\]\.content\[0\]': expected a text part .* got null", "wrong type"),
        ([], r"messages\[0\]\.content': empty user turn", "empty turn"),
    ]:
        with pytest.raises(DataError, match=message) as err:
            normalize_record({"messages": [{"role": U, "content": content}, {"role": A, "content": "R"}]}, where="f:1")
        assert err.value.kind == kind


def test_tool_use_and_developer_roles():
    assert normalize_record({"messages": [{"role": "developer", "content": "S"}, {"role": U, "content": "Q"},
                                          {"role": A, "content": "R"}]})[0] == {"role": "system", "content": "S"}
    for turns, field in [([{"role": U, "content": "Q"}, {"role": "Tool", "content": "1"}, {"role": A, "content": "R"}],
                          "messages[1].role"),
                         ([{"role": U, "content": "Q"}, {"role": A, "content": "R", "function_call": {"name": "f"}}],
                          "messages[1].function_call")]:
        with pytest.raises(DataError, match=re.escape(f"f:1: field '{field}': a tool")) as err:
            normalize_record({"messages": turns}, where="f:1")
        assert err.value.kind == "tool use"
    # an empty tool_calls list is no call
    assert len(normalize_record({"messages": [{"role": U, "content": "Q"}, {"role": A, "content": "R", "tool_calls": []}]})) == 2


def test_numeric_columns_carry_only_finite_numbers():
    from ual.data.formats import numeric_columns

    row = {"a": 1, "b": 2.5, "nan": float("nan"), "inf": float("-inf"), "huge": 10 ** 400, "flag": True, "s": "1"}
    assert numeric_columns(row) == {"a": 1, "b": 2.5}


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_streaming_json_array_names_a_repeated_key_and_reads_on(tmp_path, chunk):
    path = tmp_path / "r.json"
    path.write_text('[\n{"prompt": "a", "completion": "b"},\n{"prompt": "a", "completion": "b", "meta": {"k": 1, "k": 2}},\n'
                    '{"prompt": "c", "completion": "d"}\n]\n', encoding="utf-8")
    values = [v for _, v in iter_json_array(path, chunk=chunk)]
    assert values[0] == {"prompt": "a", "completion": "b"} and values[2] == {"prompt": "c", "completion": "d"}
    assert isinstance(values[1], DataError) and values[1].kind == "duplicate key"
    assert str(values[1]).startswith(f"{path}:3: field 'meta.k': key given twice in one object")


def test_run_folder_files_name_the_line_of_what_the_parser_cannot_read(tmp_path):
    """ual.io.read_jsonl (scores, samples: the run folder's own files) reads through the same decoder."""
    from ual.io import read_jsonl

    for name, line, message in [
        ("deep", "[" * 50_000 + "]" * 50_000, "nested deeper than about"),
        ("digits", '{"id": "a", "score": ' + "1" * 5000 + "}", "an integer with more than"),
        ("repeated", '{"id": "a", "score": 0.1, "score": 0.9}', "field 'score': key given twice"),
    ]:
        path = tmp_path / f"{name}.jsonl"
        path.write_text('{"id": "z", "score": 0.5}\n' + line + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
            read_jsonl(path)


def test_a_read_error_mid_file_names_the_file(tmp_path, monkeypatch):
    import errno

    import ual.jsonl

    path = write_jsonl(tmp_path / "disk.jsonl", [SHAPES["alpaca"], SHAPES["lima"]])

    class FailingFile:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            yield json.dumps(SHAPES["alpaca"]) + "\n"
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ual.jsonl, "open_text", lambda p: FailingFile())
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot read (after 1 rows: Input/output error)")):
        load_file(path)
