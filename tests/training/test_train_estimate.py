"""The memory/time estimate: exact parameter counts offline, and within a stated factor of a real run's peak."""

import json
import os
import subprocess
import sys

import pytest

from ual.cli import main
from ual.io import read_json
from ual.training.estimate import KNOWN_CONFIGS, estimate, model_config, model_shape

# The estimate (weights excluded) must be within this factor of the measured peak RSS increase.
FACTOR = 2.0


def test_paper_models_parameter_counts_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    counts = {}
    for name in KNOWN_CONFIGS:
        config, where = model_config(name)
        s = model_shape(config, ["q_proj", "v_proj"], 8)
        counts[name] = (s["parameters"], s["lora_parameters"], s["lora_modules"])
    # Published sizes: Llama-2-7B 6,738,415,616; Mistral-7B 7,241,732,096. LoRA r=8 on q/v: 4.19 M and 3.41 M.
    assert counts["meta-llama/Llama-2-7b-hf"] == (6_738_415_616, 4_194_304, 64)
    assert counts["mistralai/Mistral-7B-v0.1"] == (7_241_732_096, 3_407_872, 64)


def test_sharding_and_checkpointing_shrink_the_right_terms():
    s = {"parameters": 10**9, "lora_parameters": 10**6, "lora_modules": 2, "hidden": 1024, "intermediate": 4096,
         "layers": 16, "kv_dim": 1024, "vocab": 32000}
    full = estimate(s, batch_size=2, seq_len=512, lora=False, weight_bytes=2)["bytes"]
    z3 = estimate(s, batch_size=2, seq_len=512, lora=False, weight_bytes=2, processes=4, sharding="zero3")["bytes"]
    z2 = estimate(s, batch_size=2, seq_len=512, lora=False, weight_bytes=2, processes=4, sharding="zero2")["bytes"]
    gc = estimate(s, batch_size=2, seq_len=512, lora=False, weight_bytes=2, gradient_checkpointing=True)["bytes"]
    ch = estimate(s, batch_size=2, seq_len=512, lora=False, weight_bytes=2, loss="chunked")["bytes"]
    assert z3["weights"] == full["weights"] / 4 and z3["optimizer"] == full["optimizer"] / 4
    assert z2["weights"] == full["weights"] and z2["gradients"] == full["gradients"] / 4
    assert gc["activations"] < full["activations"] / 4 and ch["loss_logits"] < full["loss_logits"]
    lora = estimate(s, batch_size=2, seq_len=512, lora=True, weight_bytes=2)["bytes"]
    assert lora["optimizer"] == 2 * 10**6 * 4  # fp32 Adam moments of the adapters only


def _measured_vs_estimate(tmp_path, model):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "word " * 400}]}
            for i in range(8)]  # every sample longer than max_length: the batch is the padded worst case
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nmodel: {model}\n"
                   f"data: {{max_length: 256, sources: [{{name: {tmp_path / 'long.jsonl'}, train: 8}}]}}\n"
                   "train: {modes: [sft], max_steps: 2, batch_size: 4, report_to: none}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for stage in ("data", "train"):  # a fresh process: the peak RSS is this run's alone
        subprocess.run([sys.executable, "-m", "ual.cli", stage, str(cfg)], check=True, capture_output=True, env=env)
    mem = read_json(tmp_path / "run" / "train" / "sft" / "result.json")["memory"]
    est = mem["estimate_bytes"]["total"] - mem["estimate_bytes"]["weights"]  # weights were loaded before measuring
    return mem["measured_peak_bytes"], est


def test_estimate_within_factor_of_measured_peak_tiny(tmp_path, tiny_model_dir):
    measured, est = _measured_vs_estimate(tmp_path, tiny_model_dir)
    assert 1 / FACTOR <= measured / est <= FACTOR, (measured / 2**20, est / 2**20)


@pytest.mark.slow
def test_estimate_within_factor_of_measured_peak_smollm2(tmp_path):
    measured, est = _measured_vs_estimate(tmp_path, "smollm2-135m")
    assert 1 / FACTOR <= measured / est <= FACTOR, (measured / 2**20, est / 2**20)


def test_dry_run_prints_the_estimate_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nmodel: {tiny_model_dir}\ndata: {{sources: [{{name: {chat}}}]}}\n")
    assert main(["train", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory per process" in out and "activations" in out and "config ok" in out
    assert not (tmp_path / "run").exists()
    # A source that is not there is a clear error, exit 2.
    assert main(["train", str(cfg), "--dry-run", "--data.max_length", "0"]) == 2
    chat.unlink()
    assert main(["train", str(cfg), "--dry-run"]) == 2
    assert "no such file" in capsys.readouterr().err
