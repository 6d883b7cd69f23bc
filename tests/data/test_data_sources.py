"""Packaged offline sources (ShareGPT, GSM8K), local files and the hub's offline error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ual.config import SourceConfig
from ual.data.formats import DataError
from ual.data.sources import gsm8k_final, load_gsm8k, load_sharegpt, load_source


def test_sharegpt_packaged_parse_stops_early_and_is_valid():
    # what keeps it fast is reading only what it needs (not read to the end), checked here without a clock:
    # timings belong in benchmarks, not in tests a busy machine can fail
    samples, stats = load_sharegpt(limit=2000)
    assert len(samples) == 2000 and stats["kept"] == 2000
    assert stats["read"] == 2000 + stats["skipped"] + stats["duplicates"] and not stats["read_to_end"]
    assert len({s.id for s in samples}) == 2000
    conv_ids = [s.meta["sharegpt_id"].rsplit("_", 1)[0] for s in samples]
    assert len(set(conv_ids)) == 2000  # one part per conversation
    for s in samples:
        assert s.source == "sharegpt" and s.meta["origin"].startswith("ShareGPT_V3")
        roles = [m["role"] for m in s.messages if m["role"] != "system"]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in s.messages)
    # the same request gives the same samples
    assert [s.id for s in load_sharegpt(limit=50)[0]] == [s.id for s in samples[:50]]


def test_gsm8k_has_all_rows_with_gold_answers():
    samples, stats = load_gsm8k()
    assert len(samples) == 1319 and stats["skipped"] == 0
    first = samples[0]
    assert first.messages[0]["content"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert first.meta == {"origin": "test.jsonl:1", "answer": "18"}
    assert first.final_response.endswith("#### 18")
    assert "$18 every day" in first.final_response  # "$<<9*2=18>>18" with the annotation removed
    for s in samples:
        assert "<<" not in s.final_response and ">>" not in s.final_response
        float(s.meta["answer"])  # a plain number, commas removed
        assert s.source == "gsm8k"
    assert gsm8k_final("so 1,234 total\n#### 1,234") == "1234"


def test_load_source_dispatch(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n", encoding="utf-8")
    samples, stats = load_source(SourceConfig(name=str(path)))
    assert samples[0].source == "chat" and stats["path"] == str(path)
    samples, _ = load_source(SourceConfig(name=str(path), label="mine", format="prompt_completion"))
    assert samples[0].source == "mine"
    assert len(load_source(SourceConfig(name="sharegpt"), need=10)[0]) == 10
    with pytest.raises(DataError, match="unknown source 'nothing'"):
        load_source(SourceConfig(name="nothing"))
    with pytest.raises(DataError, match="no such file"):
        load_source(SourceConfig(name=str(tmp_path / "missing.jsonl")))


def test_hub_unreachable_is_a_clear_quick_error():
    code = (
        "from ual.config import SourceConfig\n"
        "from ual.data.sources import load_source\n"
        "from ual.data.formats import DataError\n"
        "try:\n"
        "    load_source(SourceConfig(name='hub:tatsu-lab/alpaca'))\n"
        "except DataError as exc:\n"
        "    print('ERROR', exc)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # no hanging on retries: the time-out fails the test (a bound generous enough for a busy machine)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERROR hub:tatsu-lab/alpaca: the Hugging Face Hub is unreachable" in out.stdout, out.stderr
    assert "local .jsonl/.json/.parquet" in out.stdout
