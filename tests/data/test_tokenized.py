"""The tokenized sets (ual.data.tokenized): built once in worker processes, identical to encoding each
sample alone, memory-mapped, reused while their inputs and settings hold and rebuilt (saying why)
when any changes; a failed or interrupted build leaves nothing half-written."""

from __future__ import annotations

import json
import logging

import pytest

from ual.data.formats import DataError
from ual.data.tokenize import encode_sample
from ual.data.tokenized import set_name, tokenized_set
from ual.io import read_json, write_jsonl
from ual.sample import Sample


def _samples(n: int) -> list[Sample]:
    out = []
    for i in range(n):
        if i % 3 == 0:  # multi-turn, with a system prompt
            messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                        {"role": "assistant", "content": f"Hello {i}."}, {"role": "user", "content": "And?"},
                        {"role": "assistant", "content": "More words here. " * (i % 7 + 1)}]
        else:
            messages = [{"role": "user", "content": f"What is {i} + {i}?"},
                        {"role": "assistant", "content": f"{i} + {i} = {2 * i}. " + "So it is. " * (i % 11)}]
        out.append(Sample.create("s", messages))
    return out


def _run(tmp_path, n=300):
    root = tmp_path / "run"
    samples = _samples(n)
    write_jsonl(root / "samples.jsonl", [s.to_dict() for s in samples])
    return root, samples


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_the_set_is_each_sample_encoded_alone_in_order(tmp_path, tokenizer, train_on_prompt):
    root, samples = _run(tmp_path)
    ds = tokenized_set(root, "train", tokenizer, 48, train_on_prompt, num_proc=2)
    assert len(ds) == len(samples) and ds["id"][:] == [s.id for s in samples]
    cut = 0
    for s, row in zip(samples, ds):
        enc = encode_sample(tokenizer, s.messages, 48, train_on_prompt)
        assert row["input_ids"] == enc["input_ids"] and row["labels"] == enc["labels"]
        full = len(encode_sample(tokenizer, s.messages, None, train_on_prompt)["input_ids"])
        assert row["tokens"] == len(enc["input_ids"]) and row["full_tokens"] == full
        assert row["supervised"] == sum(x != -100 for x in enc["labels"])
        cut += full > 48
    assert cut > 0  # the cut at max_length is exercised
    assert (root / "tokenized" / set_name("train", 48, train_on_prompt)).is_dir()


def test_worker_count_does_not_change_the_set(tmp_path, tokenizer):
    root, _ = _run(tmp_path)
    two = tokenized_set(root, "train", tokenizer, 64, num_proc=2)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "samples.jsonl").write_bytes((root / "samples.jsonl").read_bytes())
    one = tokenized_set(tmp_path / "copy", "train", tokenizer, 64, num_proc=1)
    assert one.to_dict() == two.to_dict()


def test_reused_then_rebuilt_when_an_input_or_setting_changes(tmp_path, tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="ual.data.tokenized")
    root, samples = _run(tmp_path, 40)
    tokenized_set(root, "train", tokenizer, 64, num_proc=1)
    folder = root / "tokenized" / set_name("train", 64, False)
    stamp = folder.stat().st_mtime_ns
    caplog.clear()
    tokenized_set(root, "train", tokenizer, 64, num_proc=1)
    assert folder.stat().st_mtime_ns == stamp and "tokenizing" not in caplog.text  # reused, not rebuilt
    assert read_json(root / "lineage.json")[f"tokenized/{folder.name}"]["settings"]["max_length"] == 64

    other = tokenized_set(root, "train", tokenizer, 32, num_proc=1)  # its own max_length: its own set
    assert (root / "tokenized" / set_name("train", 32, False)).is_dir() and max(other["tokens"][:]) <= 32
    assert folder.stat().st_mtime_ns == stamp

    write_jsonl(root / "samples.jsonl", [s.to_dict() for s in samples[:30]])  # other samples
    caplog.clear()
    assert len(tokenized_set(root, "train", tokenizer, 64, num_proc=1)) == 30
    assert "made from other inputs or settings (samples.jsonl changed)" in caplog.text

    changed = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    changed.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    caplog.clear()
    tokenized_set(root, "train", changed, 64, num_proc=1)
    assert "(tokenizer changed)" in caplog.text


def test_a_refused_sample_is_named_and_nothing_is_left_behind(tmp_path, tokenizer):
    root, samples = _run(tmp_path, 30)
    rows = [s.to_dict() for s in samples]
    refusing = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    refusing.chat_template = ("{% for m in messages %}{% if m['content'] == 'Hi 9' %}{{ raise_exception('no 9') }}"
                              "{% endif %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                              "{% if add_generation_prompt %}<assistant>{% endif %}")
    write_jsonl(root / "samples.jsonl", rows)
    with pytest.raises(DataError, match=r"samples\.jsonl:10: id '" + rows[9]["id"] + "'.*no 9"):
        tokenized_set(root, "train", refusing, 64, num_proc=1)
    tokenized = root / "tokenized"
    assert not any(tokenized.iterdir())  # no set, no scratch folder
    assert "tokenized/" not in json.dumps(read_json(root / "lineage.json") if (root / "lineage.json").exists() else {})


def test_a_killed_builds_scratch_is_cleared_and_the_set_built(tmp_path, tokenizer):
    root, samples = _run(tmp_path, 20)
    scratch = root / "tokenized" / f".build-{set_name('train', 64, False)}-x1"
    scratch.mkdir(parents=True)
    (scratch / "tokens.arrow").write_bytes(b"half")
    ds = tokenized_set(root, "train", tokenizer, 64, num_proc=1)
    assert len(ds) == 20 and not scratch.exists()


def test_every_mode_seed_and_evaluation_reads_the_sets_built_once(tmp_path, tiny_model_dir, caplog):
    """Through the CLI on the tiny model: `ual train` builds the training set once for all its modes, the
    seeds of `ual ablate` read the root's set through their linked tokenized/, `ual eval` builds the
    held-out set once for every model, and another max_length gets a set of its own."""
    from ual.cli import main

    rows = [{"messages": s.messages} for s in _samples(24)]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
name: t
run_dir: {tmp_path / 'run'}
model: {tiny_model_dir}
data: {{max_length: 48, num_proc: 2, sources: [{{name: {src}, label: chat, train: 20, heldout: 4}}]}}
train: {{max_steps: 1, batch_size: 4, report_to: none}}
eval: {{gsm8k: false, multiple_choice: false, clustering: false, pairwise: []}}
""")
    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="ual.data.tokenized")
    assert main(["data", str(cfg)]) == 0
    assert main(["train", str(cfg), "--train.modes", "sft,ls"]) == 0
    assert caplog.text.count("tokenizing samples.jsonl") == 1
    train_set = run / "tokenized" / set_name("train", 48, False)
    assert train_set.is_dir() and f"tokenized/{train_set.name}" in read_json(run / "lineage.json")
    caplog.clear()
    assert main(["ablate", str(cfg), "--modes", "sft", "--seeds", "2"]) == 0
    assert "tokenizing" not in caplog.text  # both seeds read the root's set
    assert (run / "seeds" / "seed-1" / "tokenized").is_symlink()
    caplog.clear()
    assert main(["eval", str(cfg), "--eval.models", "base,sft,ls"]) == 0
    assert caplog.text.count("tokenizing heldout.jsonl") == 1
    caplog.clear()
    assert main(["train", str(cfg), "--train.modes", "sft", "--data.max_length", "32"]) == 0
    assert caplog.text.count("tokenizing samples.jsonl") == 1 and (run / "tokenized" / "train-L32").is_dir()


def test_a_file_without_samples_gives_an_empty_set(tmp_path, tokenizer):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "heldout.jsonl").write_text("")
    ds = tokenized_set(tmp_path / "run", "heldout", tokenizer, 64, num_proc=2)
    assert len(ds) == 0 and "input_ids" in ds.column_names
    assert not (tmp_path / "run" / "tokenized").exists()  # nothing to store
