"""Paper data sources: LIMA, Deita-6k, MetaMathQA, ShareGPT V3 and DEITA selections, by name, local or 'hub'."""

import pytest
from paper_files import write_deita, write_lima, write_metamathqa, write_selection, write_sharegpt

from ual.config import SourceConfig
from ual.data import paper
from ual.data.formats import DataError
from ual.data.sources import input_path, load_source, source_label
from ual.models import resolve_chat_template


def test_lima_local(tmp_path):
    f = write_lima(tmp_path / "train.jsonl")
    spec = SourceConfig(name="lima", path=str(f))
    samples, stats = load_source(spec)
    assert len(samples) == 12 and source_label(spec) == "lima" and input_path(spec) == f
    assert samples[0].messages[0] == {"role": "user", "content": "Question 0: how do I sort a list?"}
    assert [m["role"] for m in samples[0].messages] == ["user", "assistant", "user", "assistant"]
    assert stats["paper_source"] == "lima" and stats["hub"] is None


def test_deita_metamath_sharegpt_local(tmp_path):
    d, _ = load_source(SourceConfig(name="deita-6k", path=str(write_deita(tmp_path / "deita_6k.json"))))
    assert len(d) == 12 and d[0].source == "deita" and d[0].messages[1]["role"] == "assistant"
    m, st = load_source(SourceConfig(name="metamathqa", path=str(write_metamathqa(tmp_path / "MetaMathQA-395K.json"))))
    assert len(m) == 12 and m[3].source == "metamath" and m[3].meta["answer"] == "7" and m[3].meta["type"] == "GSM_AnsAug"
    assert st["with_answer"] == 12
    s, st = load_source(SourceConfig(name="sharegpt-v3", path=str(write_sharegpt(tmp_path / "sg.json"))), need=5)
    assert len(s) == 5 and s[0].source == "sharegpt"
    s, st = load_source(SourceConfig(name="sharegpt-v3", path=str(tmp_path / "sg.json")))
    assert len(s) == 12 and st["other_parts"] == 12 and st["skipped"] == 1


def test_selection_sources_need_a_path_and_keep_answers(tmp_path):
    with pytest.raises(DataError, match="ual select --source metamathqa --n 6000"):
        load_source(SourceConfig(name="metamath-6k"))
    pool = load_source(SourceConfig(name="metamathqa", path=str(write_metamathqa(tmp_path / "m.json"))))
    sel = write_selection(tmp_path / "metamath-6k.jsonl", pool, n=5)
    samples, _ = load_source(SourceConfig(name="metamath-6k", path=str(sel)))
    assert len(samples) == 5 and all(s.source == "metamath" and "answer" in s.meta for s in samples)


def test_hub_path_by_name(tmp_path, monkeypatch):
    """Without `path`, the published file comes from the hub (here: a local file standing in for the download)."""
    f = write_lima(tmp_path / "hub-train.jsonl", n=4)
    asked = []
    monkeypatch.setattr(paper, "hub_file", lambda repo, name: asked.append((repo, name)) or f)
    samples, stats = load_source(SourceConfig(name="lima"))
    assert asked == [("GAIR/lima", "train.jsonl")] and len(samples) == 4 and stats["hub"] == "GAIR/lima"
    assert input_path(SourceConfig(name="lima")) is None


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="give the file as `path:`"):
        load_source(SourceConfig(name="deita-6k"))


def test_path_only_for_named_sources(tmp_path):
    with pytest.raises(DataError, match="only for the named paper sources"):
        load_source(SourceConfig(name="gsm8k", path="x.jsonl"))


def test_metamath_answer():
    assert paper.metamath_answer("so 3 + 4 = 7.\nThe answer is: 7") == "7"
    assert paper.metamath_answer("The answer is: 1,000.") == "1000"
    assert paper.metamath_answer("The answer is: \\frac{1}{2}") == "\\frac{1}{2}"
    assert paper.metamath_answer("no final line") is None


def test_vicuna_template_masks_replies_only(tokenizer):
    from ual.data.tokenize import encode_sample

    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = resolve_chat_template("vicuna")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    enc = encode_sample(tok, msgs, None)
    supervised = tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100])
    assert supervised.replace(tok.eos_token, "|").split() == ["hello|", "4|"]
    with pytest.raises(ValueError, match="not a built-in template"):
        resolve_chat_template("nope")
