"""Per-sample loss weights in `ual train` (train.weight_column) and train.eaft_topk, end to end on the
tiny model through the CLI: a source's numeric column reaches samples.jsonl meta, is checked, and
weights the loss; a weight of 0 is the sample masked out (with the kept weights rescaled to keep the
token denominator's scale); eaft_topk reaches the loss."""

import json

import pytest
import torch

from ual.cli import main
from ual.config import ConfigError, load_config
from ual.io import read_json, read_jsonl

N = 8
KEPT = [0, 2, 3, 6]  # samples whose weight is not 0


def _messages(i):
    return [{"role": "user", "content": f"Question {i}: what do you know about the sea?"},
            {"role": "assistant", "content": "The sea is large and deep. " * (1 + i % 3) + f"Fact {i}."}]


def _supervised(tokenizer, messages):
    """Supervised tokens of one sample as the loss counts them (shifted labels)."""
    from ual.data.tokenize import encode_sample

    return sum(x != -100 for x in encode_sample(tokenizer, messages, 64)["labels"][1:])


def _run(tmp_path, model_dir, name, rows, train: str, modes="[sft]"):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
name: {name}
run_dir: {tmp_path / name}
model: {model_dir}
data:
  max_length: 64
  sources: [{{name: {src}, label: sea}}]
train: {{modes: {modes}, max_steps: 2, warmup_ratio: 0, learning_rate: 0.01, lora_dropout: 0, logging_steps: 1, {train}}}
""")
    assert main(["data", str(cfg)]) == 0
    return cfg, tmp_path / name


def _losses(run, mode="sft"):
    return [h["loss"] for h in read_json(run / "train" / mode / "log.json") if "loss" in h]


def _adapter(run, mode="sft"):
    from safetensors.torch import load_file

    return load_file(str(run / "train" / mode / "adapter" / "adapter_model.safetensors"))


def test_zero_weights_change_the_loss_and_equal_masking(tmp_path, tiny_model_dir, tokenizer):
    tokens = [_supervised(tokenizer, _messages(i)) for i in range(N)]
    # Weight 0 removes a sample from the numerator; the denominator still counts its tokens
    # (ual.loss), so the kept samples get total / kept tokens to equal the batch without them.
    scale = sum(tokens) / sum(tokens[i] for i in KEPT)
    rows = [{"messages": _messages(i), "w": scale if i in KEPT else 0} for i in range(N)]
    cfg, weighted = _run(tmp_path, tiny_model_dir, "weighted", rows, "batch_size: 8, weight_column: w",
                         modes="[sft, eaft]")
    assert main(["train", str(cfg), "--train.eaft_topk", "2"]) == 0
    _, ones = _run(tmp_path, tiny_model_dir, "ones", rows, "batch_size: 8")
    assert main(["train", str(tmp_path / "ones.yaml")]) == 0
    kept_rows = [{"messages": _messages(i)} for i in KEPT]
    _, masked = _run(tmp_path, tiny_model_dir, "masked", kept_rows, "batch_size: 4")
    assert main(["train", str(tmp_path / "masked.yaml")]) == 0

    meta = {r["id"]: r["meta"]["w"] for r in read_jsonl(weighted / "samples.jsonl")}
    assert sorted(meta.values()) == sorted(r["w"] for r in rows)  # the source column, carried into meta
    result = read_json(weighted / "train" / "sft" / "result.json")
    assert result["weight_column"] == "w" and result["mean_weight"] == pytest.approx(sum(meta.values()) / N)
    # One batch of every sample per step: the weighted run is the run without the zero-weight samples.
    w, o, m = _losses(weighted), _losses(ones), _losses(masked)
    assert len(w) == len(o) == len(m) == 2
    assert w == pytest.approx(m, rel=1e-6)
    # A random model's token losses are all near log V, so all-ones differs by ~3e-4 (relative) only:
    # still 100 times the tolerance above.
    assert w[0] != pytest.approx(o[0], rel=1e-4) and w[1] != pytest.approx(o[1], rel=1e-4)
    a, b = _adapter(weighted), _adapter(masked)
    assert set(a) == set(b)
    worst = max(float((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-12)) for k in a)
    assert worst < 1e-4, worst
    assert any(not torch.allclose(a[k], _adapter(ones)[k]) for k in a)

    # eaft_topk reaches the loss: step 1 (LoRA B = 0: the base model) recomputed with k = 2.
    eaft = read_json(weighted / "train" / "eaft" / "result.json")
    assert eaft["eaft_topk"] == 2 and result["eaft_topk"] is None
    step1 = _losses(weighted, "eaft")[0]
    assert step1 == pytest.approx(_base_loss(tiny_model_dir, tokenizer, weighted, 2), rel=1e-4)
    assert step1 != pytest.approx(_base_loss(tiny_model_dir, tokenizer, weighted, 20), rel=1e-3)


def _base_loss(model_dir, tokenizer, run, k):
    """The eaft loss of the base model on the whole (weighted) training set, through ual.loss directly."""
    from transformers import AutoModelForCausalLM

    from ual.data.tokenize import encode_sample
    from ual.loss import shift_labels, smoothed_cross_entropy
    from ual.training.trainer import SmoothedDataset, SmoothingCollator

    rows = read_jsonl(run / "samples.jsonl")
    encoded = [encode_sample(tokenizer, r["messages"], 64) for r in rows]
    batch = SmoothingCollator(tokenizer.pad_token_id)(list(SmoothedDataset(encoded, [0.0] * len(rows),
                                                                           [r["meta"]["w"] for r in rows])))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(model_dir)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return float(smoothed_cross_entropy(logits, shift_labels(batch["labels"]), batch["eps"], token_scale="eaft",
                                            eaft_topk=k, sample_weights=batch["weight"]))


@pytest.mark.parametrize("value, problem", [
    (None, "meta field 'w': missing"),
    (-1, "meta field 'w': -1 is not a finite number >= 0"),
    ("NaN", "meta field 'w': nan is not a finite number >= 0"),
])
def test_a_bad_weight_names_the_file_line_and_id(tmp_path, tiny_model_dir, capsys, value, problem):
    rows = [{"messages": _messages(i), "w": 1.0} for i in range(4)]
    cfg, run = _run(tmp_path, tiny_model_dir, "bad", rows, "weight_column: w")
    # Break the third sample's weight in samples.jsonl (a source row without the column, or a bad value).
    lines = (run / "samples.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    if value is None:
        del row["meta"]["w"]
    else:
        row["meta"]["w"] = float(value) if isinstance(value, str) else value
    lines[2] = json.dumps(row)
    (run / "samples.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"samples.jsonl:3: id '{row['id']}' (from {row['meta']['origin']}): {problem}" in err
    assert "train.weight_column: w" in err
    assert not (run / "train").exists()  # refused before any training


def test_a_non_numeric_column_is_not_carried(tmp_path, tiny_model_dir, capsys):
    rows = [{"messages": _messages(i), "w": "heavy" if i == 1 else 2, "flag": True} for i in range(3)]
    cfg, run = _run(tmp_path, tiny_model_dir, "text", rows, "weight_column: w")
    metas = {r["meta"]["origin"].rsplit(":", 1)[1]: r["meta"] for r in read_jsonl(run / "samples.jsonl")}
    assert metas["1"].get("w") == 2 and "w" not in metas["2"] and "flag" not in metas["1"]
    assert main(["train", str(cfg)]) == 2
    assert "meta field 'w': missing" in capsys.readouterr().err


def test_config_checks_eaft_topk_and_weight_column(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  eaft_topk: 1\n")
    with pytest.raises(ConfigError, match=r"exp.yaml:train.eaft_topk: expected at least 2, got 1"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--train.eaft_topk: expected an integer"):
        load_config(None, {"train.eaft_topk": "many"})
    with pytest.raises(ConfigError, match=r"--train.weight_column: expected a string"):
        load_config(None, {"train.weight_column": [1, 2]})
    cfg = load_config(None, {"train.eaft_topk": 5, "train.weight_column": "quality"})
    assert cfg.train.eaft_topk == 5 and cfg.train.weight_column == "quality"
    assert load_config(None).train.eaft_topk == 20 and load_config(None).train.weight_column is None
