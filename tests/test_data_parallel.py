"""`ual score` and `ual eval` as data parallel under `accelerate launch` (2 CPU processes over gloo, ual/shards.py).

The processes are started as tests/training/test_train_distributed.py starts them (configs/accelerate/cpu2.yaml:
accelerate's torchrun launcher). Each result is compared with one process over the same run folder: the
same rows in the same order, scores and metrics within float tolerance (the batches differ: a process
sorts its own shard by length).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ual.cli import main
from ual.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _launch_args(args):
    return [ACCELERATE, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu2.yaml"),
            "--dynamo_backend", "no", "-m", "ual.cli"] + args


def _launch(args, timeout=900):
    proc = subprocess.run(_launch_args(args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _run_folder(tmp_path, tiny_model_dir, name, n_train, n_heldout, shard_size, extra=""):
    """A run folder with `ual data` done: chat samples of several lengths from two sources."""
    chat = tmp_path / "chat.jsonl"
    if not chat.exists():
        chat.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": f"question {i}: " + "why " * (i % 5)},
            {"role": "assistant", "content": "an answer " * (1 + i % 7) + str(i)}]}) + "\n" for i in range(600)))
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
run_dir: {tmp_path / name}
model: {tiny_model_dir}
shard_size: {shard_size}
data:
  max_length: 96
  sources:
    - {{name: {chat}, train: {n_train}, heldout: {n_heldout}}}
    - {{name: gsm8k, train: {n_train // 4}, heldout: {n_heldout}}}
score: {{scorer: entropy_ratio, batch_size: 4}}
{extra}
""")
    assert main(["data", str(cfg)]) == 0
    return cfg


def _same_rows(one: list[dict], two: list[dict]):
    assert [(r["id"], r["source"], r["scorer"]) for r in one] == [(r["id"], r["source"], r["scorer"]) for r in two]
    for a, b in zip(one, two):
        assert (a["score"] is None) == (b["score"] is None)
        if a["score"] is not None:
            assert b["score"] == pytest.approx(a["score"], rel=1e-4, abs=1e-6), a["id"]
        assert a["details"].keys() == b["details"].keys()
        for key, value in a["details"].items():
            assert b["details"][key] == (pytest.approx(value, rel=1e-4) if isinstance(value, float) else value)


def test_score_across_two_processes_equals_one(tmp_path, tiny_model_dir):
    one = _run_folder(tmp_path, tiny_model_dir, "one", 24, 6, 5)
    two = _run_folder(tmp_path, tiny_model_dir, "two", 24, 6, 5)
    assert main(["score", str(one)]) == 0
    proc = _launch(["score", str(two)])
    for name in ("scores.jsonl", "heldout_scores.jsonl"):
        _same_rows(read_jsonl(tmp_path / "one" / name), read_jsonl(tmp_path / "two" / name))
    # 42 samples (30 training, 12 held-out) in shards of 5: 9 shards, 5 and 4 computed by the processes
    assert len(re.findall(r"shard \d+ of 9 written", proc.stderr)) == 9
    assert not (tmp_path / "two" / "shards").exists()  # merged into the outputs, then removed
    assert json.loads(proc.stdout)["scored"] == 30
    # another scorer of the same forward passes comes from the kept details, in either case
    assert main(["score", str(one), "--score.scorer", "entropy"]) == 0
    proc = _launch(["score", str(two), "--score.scorer", "entropy"])
    assert "no model call" in proc.stderr
    _same_rows(read_jsonl(tmp_path / "one" / "scores.jsonl"), read_jsonl(tmp_path / "two" / "scores.jsonl"))


def test_prior_runs_on_rank_0_alone(tmp_path, tiny_model_dir):
    """A scorer without a model (the prior; the API judge likewise) is not sharded: rank 0 scores, the others
    end with the stage."""
    one = _run_folder(tmp_path, tiny_model_dir, "one", 8, 2, 3)
    two = _run_folder(tmp_path, tiny_model_dir, "two", 8, 2, 3)
    assert main(["score", str(one), "--score.scorer", "prior", "--score.prior", "{chat: 0.8, gsm8k: 0.2}"]) == 0
    proc = _launch(["score", str(two), "--score.scorer", "prior", "--score.prior", "{chat: 0.8, gsm8k: 0.2}"])
    assert "shard" not in proc.stderr and json.loads(proc.stdout)["scored"] == 10
    assert read_jsonl(tmp_path / "one" / "scores.jsonl") == read_jsonl(tmp_path / "two" / "scores.jsonl")


def test_local_judge_across_two_processes_equals_one(tmp_path, tiny_model_dir):
    one = _run_folder(tmp_path, tiny_model_dir, "one", 8, 2, 3)
    two = _run_folder(tmp_path, tiny_model_dir, "two", 8, 2, 3)
    assert main(["score", str(one), "--score.scorer", "local_judge"]) == 0
    proc = _launch(["score", str(two), "--score.scorer", "local_judge"])
    # 14 samples (10 training, 4 held-out) in shards of 3: 5 shards
    assert len(re.findall(r"shard \d+ of 5 written", proc.stderr)) == 5
    for name in ("scores.jsonl", "heldout_scores.jsonl"):
        _same_rows(read_jsonl(tmp_path / "one" / name), read_jsonl(tmp_path / "two" / name))


def _kill_after_first_shard(args, shard_dir: Path, job: str) -> list[str]:
    """Launch `ual ARGS` on 2 processes, kill -9 every process once a shard of `job` is on disk, rerun it: the
    rerun reads exactly the shards that were there (the names of those, returned) and computes the others."""
    launcher = subprocess.Popen(_launch_args(args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list(shard_dir.glob(f"{job}-*/shard-*.jsonl")) and time.time() < deadline:
        assert launcher.poll() is None, "the run ended before a shard was seen"
        time.sleep(0.005)
    workers = psutil.Process(launcher.pid).children(recursive=True)
    for p in workers + [psutil.Process(launcher.pid)]:  # kill -9: the processes die where they are
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(workers, timeout=30)
    launcher.wait(timeout=30)
    done = sorted(p.name for p in shard_dir.glob(f"{job}-*/shard-*.jsonl"))
    proc = _launch(args)
    skipped = re.findall(rf"{job}-\w+: shard (\d+) \(items \d+-\d+\) was finished by an earlier run; not computed "
                         r"again", proc.stderr)
    assert sorted(f"shard-{int(k):06d}.jsonl" for k in skipped) == done
    assert not shard_dir.exists()
    return done


def test_score_shard_finished_before_kill_is_not_redone(tmp_path, tiny_model_dir):
    one = _run_folder(tmp_path, tiny_model_dir, "one", 400, 10, 2, "")
    two = _run_folder(tmp_path, tiny_model_dir, "two", 400, 10, 2, "")
    done = _kill_after_first_shard(["score", str(two)], tmp_path / "two" / "shards", "score")
    assert 1 <= len(done) < 260  # 520 samples in shards of 2: some, not all, were finished
    assert main(["score", str(one)]) == 0
    for name in ("scores.jsonl", "heldout_scores.jsonl"):
        _same_rows(read_jsonl(tmp_path / "one" / name), read_jsonl(tmp_path / "two" / name))


def test_eval_shard_finished_before_kill_is_not_redone(tmp_path, tiny_model_dir):
    nll_only = ("eval: {models: [base], gsm8k: false, multiple_choice: false, clustering: false, pairwise: [], "
                "compare: [], answers_per_source: 0, batch_size: 4}")
    one = _run_folder(tmp_path, tiny_model_dir, "one", 8, 150, 2, nll_only)
    two = _run_folder(tmp_path, tiny_model_dir, "two", 8, 150, 2, nll_only)
    done = _kill_after_first_shard(["eval", str(two)], tmp_path / "two" / "shards", "nll-base")
    assert 1 <= len(done) < 150  # 300 held-out samples in shards of 2
    assert main(["eval", str(one)]) == 0
    _close(read_jsonl(tmp_path / "one" / "eval" / "items" / "base.nll.jsonl"),
           read_jsonl(tmp_path / "two" / "eval" / "items" / "base.nll.jsonl"))


EVAL = ("eval: {models: [base], max_new_tokens: 8, batch_size: 4, gsm8k_limit: 7, mc_limit: 4, mc_samples: 2, "
        "clustering: false, pairwise: [], compare: [], answers_per_source: 1, tasks: ['arc_easy:6', gsm8k_heldout], "
        "tasks_limit: 4}")


def _close(a, b, path="") -> None:
    """Equal JSON-like values, floats within tolerance."""
    if isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_eval_across_two_processes_equals_one(tmp_path, tiny_model_dir):
    import numpy as np

    one = _run_folder(tmp_path, tiny_model_dir, "one", 8, 9, 4, EVAL)
    two = _run_folder(tmp_path, tiny_model_dir, "two", 8, 9, 4, EVAL)
    assert main(["eval", str(one)]) == 0
    proc = _launch(["eval", str(two)])
    # 18 held-out samples in shards of 4: 5 shards of NLL; 7 maths samples: 2 shards of GSM8K
    assert len(re.findall(r"nll-base-\w+: shard \d+ of 5 written", proc.stderr)) == 5
    assert len(re.findall(r"gsm8k-base-\w+: shard \d+ of 2 written", proc.stderr)) == 2
    for task in ("arc_easy", "gsm8k_heldout"):  # lm-eval shared each task's items between the processes
        assert f"Building contexts for {task} on rank 1" in proc.stderr
    a, b = (json.loads((tmp_path / run / "eval" / "base.json").read_text()) for run in ("one", "two"))
    for metric in ("nll", "calibration", "maths", "multiple_choice"):
        _close(a[metric], b[metric], metric)
    assert a["maths"]["n_questions"] == 7 and set(a["nll"]) == {"chat", "gsm8k", "all"}
    for kind in ("nll", "maths", "mc", "task-arc_easy"):
        _close(read_jsonl(tmp_path / "one" / "eval" / "items" / f"base.{kind}.jsonl"),
               read_jsonl(tmp_path / "two" / "eval" / "items" / f"base.{kind}.jsonl"), kind)
    with np.load(tmp_path / "one" / "eval" / "items" / "base.tokens.npz") as x, \
            np.load(tmp_path / "two" / "eval" / "items" / "base.tokens.npz") as y:
        assert (x["item"] == y["item"]).all() and (x["correct"] == y["correct"]).all()
        assert np.allclose(x["confidence"], y["confidence"], rtol=1e-4, atol=1e-6)
    ta, tb = (json.loads((tmp_path / run / "eval" / "tasks" / "base.json").read_text()) for run in ("one", "two"))
    assert tb["n_samples"] == ta["n_samples"] == {"arc_easy": 6, "gsm8k_heldout": 4}
    _close(ta["results"], tb["results"], "results")  # lm-eval's generation (GSM8K) and log-likelihood tasks
    _close(ta["benchmarks"], tb["benchmarks"], "benchmarks")
    assert not (tmp_path / "two" / "shards").exists()
