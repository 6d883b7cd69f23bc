"""The `ual data` stage: deterministic, disjoint train/held-out files and honest statistics."""

from __future__ import annotations

import json

import pytest

from ual.config import DataConfig, ExperimentConfig, SourceConfig
from ual.data.stage import build_dataset, read_samples
from ual.data.formats import DataError
from ual.data.tokenize import encode_sample


def chat_file(path, n=40):
    if path.exists():  # a test may have edited it
        return path
    rows = [{"instruction": f"Tell me fact {i}.", "output": f"Fact {i}: " + "very long " * (i % 4) * 20} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def config(tmp_path, run, seed=0, max_length=128, **chat):
    sources = [SourceConfig(name="gsm8k", train=30, heldout=10),
               SourceConfig(name=str(chat_file(tmp_path / "facts.jsonl")), **({"train": 20, "heldout": 5} | chat))]
    return ExperimentConfig(name=run, run_dir=str(tmp_path / run), seed=seed,
                            data=DataConfig(sources=sources, max_length=max_length))


def ids(path):
    return [s.id for s in read_samples(path)]


def test_build_is_deterministic_and_disjoint(tmp_path, tokenizer):
    stats = build_dataset(config(tmp_path, "a"), tokenizer)
    build_dataset(config(tmp_path, "b"), tokenizer)
    build_dataset(config(tmp_path, "c", seed=1), tokenizer)
    a = tmp_path / "a"
    train, held = read_samples(a / "samples.jsonl"), read_samples(a / "heldout.jsonl")
    assert len(train) == 50 and len(held) == 15
    assert not {s.id for s in train} & {s.id for s in held}
    assert len({s.id for s in train}) == 50
    assert {s.source for s in train} == {"gsm8k", "facts"}
    assert all(s.meta["split"] == "train" for s in train) and all(s.meta["split"] == "heldout" for s in held)
    assert all("answer" in s.meta for s in train + held if s.source == "gsm8k")
    # same seed -> same files; another seed -> another selection
    assert (a / "samples.jsonl").read_bytes() == (tmp_path / "b" / "samples.jsonl").read_bytes()
    assert ids(a / "heldout.jsonl") == ids(tmp_path / "b" / "heldout.jsonl")
    assert set(ids(a / "samples.jsonl")) != set(ids(tmp_path / "c" / "samples.jsonl"))
    assert set(ids(a / "heldout.jsonl")) != set(ids(tmp_path / "c" / "heldout.jsonl"))
    # the statistics on disk are the ones returned, and the truncation counts are right
    assert json.loads((a / "data_stats.json").read_text()) == stats
    g, f = stats["sources"]["gsm8k"], stats["sources"]["facts"]
    assert (g["read"], g["train"], g["heldout"], g["skipped"]) == (1319, 30, 10, 0)
    assert (f["read"], f["train"], f["heldout"]) == (40, 20, 5)
    assert stats["train"] == 50 and stats["heldout"] == 15
    longer = sum(len(encode_sample(tokenizer, s.messages, None)["input_ids"]) > 128
                 for s in train + held if s.source == "facts")
    assert f["truncated"] == longer > 0
    assert f["train_lengths"]["tokens_max"] > 128


def test_train_null_takes_all_the_rest(tmp_path):
    stats = build_dataset(config(tmp_path, "rest", train=None, heldout=8))
    assert stats["sources"]["facts"]["train"] == 32 and stats["sources"]["facts"]["heldout"] == 8
    assert "truncated" not in stats["sources"]["facts"]  # no tokenizer, no length statistics


def test_too_few_samples_is_an_error_saying_how_many(tmp_path):
    with pytest.raises(DataError, match=r"source 'facts' has only 40 usable samples, but 5 held-out \+ 50 training"):
        build_dataset(config(tmp_path, "few", train=50))
    assert not (tmp_path / "few" / "samples.jsonl").exists()


def test_skip_mode_and_bad_rows_in_build(tmp_path):
    path = chat_file(tmp_path / "facts.jsonl")
    with path.open("a", encoding="utf-8") as fh:
        fh.write('{"instruction": "no answer"}\n')
    cfg = config(tmp_path, "bad")
    with pytest.raises(DataError, match=r"facts\.jsonl:41: unknown format"):
        build_dataset(cfg)
    cfg.data.on_error = "skip"
    assert build_dataset(cfg)["sources"]["facts"]["skipped"] == 1


def test_never_overwrites_an_input_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mine = chat_file(run / "samples.jsonl")
    before = mine.read_bytes()
    cfg = ExperimentConfig(run_dir=str(run), data=DataConfig(sources=[SourceConfig(name=str(mine), train=5)]))
    with pytest.raises(DataError, match="would be overwritten"):
        build_dataset(cfg)
    assert mine.read_bytes() == before


def test_sharegpt_in_a_build_reads_only_what_it_needs(tmp_path):
    cfg = ExperimentConfig(run_dir=str(tmp_path / "sg"), data=DataConfig(
        sources=[SourceConfig(name="sharegpt", train=40, heldout=10)]))
    stats = build_dataset(cfg)["sources"]["sharegpt"]
    assert (stats["kept"], stats["train"], stats["heldout"]) == (50, 40, 10)
    assert stats["read"] < 100


def test_a_write_that_fails_part_way_leaves_the_last_outputs(tmp_path, monkeypatch):
    """The three outputs are swapped in together: a disk that fills while the stats are written leaves the
    last run's samples, held-out samples and stats, and no staged file."""
    import ual.data.stage

    path = chat_file(tmp_path / "facts.jsonl")
    cfg = ExperimentConfig(run_dir=str(tmp_path / "run"), data=DataConfig(sources=[SourceConfig(name=str(path), heldout=5)]))
    build_dataset(cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ual.data.stage, "write_json", full_disk)
    cfg.data.sources[0].heldout = 4  # other samples: they must not replace the last ones without their stats
    with pytest.raises(OSError, match="No space left"):
        build_dataset(cfg)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_sources_stream_through_a_scratch_file_that_is_removed(tmp_path, tokenizer):
    """Each source is read once into a scratch file and the outputs are written from it by offset, in their
    shuffled order: the same outputs with token counts in 1 or 2 worker processes (chunks of 256 samples
    in flight, so a source of more than one chunk), and no scratch file left, a killed run's included."""
    rows = [{"prompt": f"Question {i}?", "completion": "word " * (1 + i % 50)} for i in range(700)]
    src = tmp_path / "many.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    outputs = {}
    for workers in (1, 2):
        run = tmp_path / f"run{workers}"
        run.mkdir()
        (run / ".data-spool-999999.jsonl").write_text("left by a killed run\n")
        cfg = ExperimentConfig(run_dir=str(run), data=DataConfig(
            sources=[SourceConfig(name=str(src), train=500, heldout=100)], max_length=64, num_proc=workers))
        stats = build_dataset(cfg, tokenizer)
        assert not list(run.glob(".data-spool-*")) and not list(run.glob(".*.new"))
        outputs[workers] = {n: (run / n).read_bytes() for n in ("samples.jsonl", "heldout.jsonl", "data_stats.json")}
    assert outputs[1] == outputs[2]
    train = read_samples(tmp_path / "run1" / "samples.jsonl")
    assert len(train) == 500 and stats["sources"]["many"]["available"] == 700
    assert {s.meta["origin"] for s in train} <= {f"{src}:{i + 1}" for i in range(700)}
    assert stats["sources"]["many"]["train_lengths"]["truncated"] > 0  # counted, not cut away


def test_max_turns_keeps_the_first_of_conversations_it_makes_identical(tmp_path):
    """Two conversations that differ only after the first exchange are one sample under max_turns 1:
    the first one read is kept (its origin line), the other counted."""
    first = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    rows = [{"messages": first + [{"role": "user", "content": f"And {i}?"}, {"role": "assistant", "content": "Yes."}]}
            for i in range(2)] + [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant",
                                                                                       "content": "A."}]} for i in range(4)]
    src = tmp_path / "turns.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = ExperimentConfig(run_dir=str(tmp_path / "run"), data=DataConfig(
        sources=[SourceConfig(name=str(src), heldout=0, max_turns=1)]))
    stats = build_dataset(cfg)
    samples = read_samples(tmp_path / "run" / "samples.jsonl")
    assert stats["sources"]["turns"]["duplicates_after_max_turns"] == 1 and len(samples) == 5
    assert next(s for s in samples if s.messages == first).meta["origin"] == f"{src}:1"
