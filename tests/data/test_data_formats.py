"""Row shapes, file readers and bad input: real files written into tmp_path."""

from __future__ import annotations

import json

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
