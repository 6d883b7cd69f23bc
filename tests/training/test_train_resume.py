"""Checkpoints every N steps and `ual train --resume`: a run killed with SIGKILL, resumed, ends where an unbroken one does."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ual.cli import main
from ual.io import read_json

STEPS, SAVE = 40, 5


def _config(tmp_path, model_dir, name, mode="ppl", batching="padded"):
    chat = tmp_path / "chat.jsonl"
    if not chat.exists():
        rows = [{"messages": [{"role": "user", "content": f"Say something about number {i}"},
                              {"role": "assistant", "content": f"Number {i} is " + "quite nice " * (1 + i % 5)}]}
                for i in range(16)]
        chat.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
run_dir: {tmp_path / name}
model: {model_dir}
data: {{max_length: 48, sources: [{{name: {chat}, train: 16}}]}}
smoothing: {{target_mean: 0.2}}
train: {{modes: [{mode}], max_steps: {STEPS}, save_steps: {SAVE}, batch_size: 2, logging_steps: 1,
         learning_rate: 1.0e-3, report_to: none, batching: {batching}}}
""")
    assert main(["data", str(cfg)]) == 0
    return cfg


def _losses(run, mode="ppl"):
    return {h["step"]: h["loss"] for h in read_json(run / "train" / mode / "log.json") if "loss" in h}


def _kill_after_first_checkpoint(cfg, ckpts, also):
    proc = subprocess.Popen([sys.executable, "-m", "ual.cli", "train", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if [p for p in ckpts.glob("checkpoint-*") if (p / also).exists()]:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed: raise STEPS"


def test_sigkill_then_resume_matches_an_unbroken_run(tmp_path, tiny_model_dir):
    whole = _config(tmp_path, tiny_model_dir, "whole")
    assert main(["train", str(whole)]) == 0
    want = read_json(tmp_path / "whole" / "train" / "ppl" / "result.json")

    cfg = _config(tmp_path, tiny_model_dir, "killed")
    ckpts = tmp_path / "killed" / "train" / "ppl" / "checkpoints"
    _kill_after_first_checkpoint(cfg, ckpts, "ual_ppl_state.json")
    assert not (tmp_path / "killed" / "train" / "ppl" / "result.json").exists()

    assert main(["train", str(cfg), "--resume"]) == 0
    got = read_json(tmp_path / "killed" / "train" / "ppl" / "result.json")
    assert got["resumed_from"] is not None and got["steps"] == STEPS
    start = int(got["resumed_from"].rsplit("-", 1)[1])
    assert 0 < start < STEPS
    assert got["final_loss"] == pytest.approx(want["final_loss"], rel=1e-4, abs=1e-5)
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "killed")
    assert all(b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-5) for s in range(start + 1, STEPS + 1))


@pytest.mark.parametrize("batching", ["grouped", "padding_free"])
def test_sigkill_then_resume_bit_identical_with_grouped_and_padding_free(tmp_path, tiny_model_dir, batching):
    """40 steps over 16 samples (5 epochs: the grouped order is drawn again each epoch), killed after the first
    checkpoint and resumed: every logged loss after the resume point is the unbroken run's, to the bit."""
    whole = _config(tmp_path, tiny_model_dir, "whole", "ls", batching)
    assert main(["train", str(whole)]) == 0
    cfg = _config(tmp_path, tiny_model_dir, "killed", "ls", batching)
    _kill_after_first_checkpoint(cfg, tmp_path / "killed" / "train" / "ls" / "checkpoints", "trainer_state.json")
    assert main(["train", str(cfg), "--resume"]) == 0
    got = read_json(tmp_path / "killed" / "train" / "ls" / "result.json")
    start = int(got["resumed_from"].rsplit("-", 1)[1])
    assert 0 < start < STEPS and got["batching"] == batching
    a, b = _losses(tmp_path / "whole", "ls"), _losses(tmp_path / "killed", "ls")
    assert [b[s] for s in range(start + 1, STEPS + 1)] == [a[s] for s in range(start + 1, STEPS + 1)]
