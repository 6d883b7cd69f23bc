"""SampleFile: sample files read from disk a sample at a time, with ids and sources as columns."""

from __future__ import annotations

import json

import pytest

from ual.io import read_jsonl
from ual.sample import Sample
from ual.sample_file import SampleFile, ids_and_sources


def write(path, samples, blank_after=None):
    lines = [json.dumps(s.to_dict(), ensure_ascii=False) + "\n" for s in samples]
    if blank_after is not None:
        lines.insert(blank_after, "\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


def make(n, source, start=0):
    return [Sample.create(source, [{"role": "user", "content": f"Frage {i} — ü?"},
                                   {"role": "assistant", "content": f"Antwort {i}"}], {"origin": f"x:{i}"})
            for i in range(start, start + n)]


def test_two_files_read_as_one_sequence(tmp_path):
    train, held = make(5, "maths"), make(3, "chat", 10)
    f = SampleFile(write(tmp_path / "s.jsonl", train, blank_after=2), write(tmp_path / "h.jsonl", held))
    every = train + held
    assert len(f) == 8 and f.split_sizes() == [5, 3]
    assert f.ids == [s.id for s in every] and f.sources == ["maths"] * 5 + ["chat"] * 3
    assert list(f) == every  # in order, the blank line skipped
    assert [f[i] for i in range(8)] == every and f[-1] == held[-1] and f[4] == train[4] and f[5] == held[0]
    assert f[3:7] == every[3:7] and f[::3] == every[::3]
    with pytest.raises(IndexError):
        f[8]
    assert ids_and_sources(f) == (f.ids, f.sources)
    assert ids_and_sources(every) == (f.ids, f.sources)
    assert [s.to_dict() for s in f] == read_jsonl(tmp_path / "s.jsonl") + read_jsonl(tmp_path / "h.jsonl")


def test_an_empty_file_and_a_bad_row(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    f = SampleFile(write(tmp_path / "s.jsonl", make(2, "a")), empty)
    assert len(f) == 2 and f.split_sizes() == [2, 0] and len(list(f)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(make(1, "a")[0].to_dict()) + "\n" + json.dumps({"id": "x", "messages": []}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'source'"):
        SampleFile(bad)
