"""Every stage of the CLI, in order, on a tiny random model and small real data; then reruns."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ual.cli import main
from ual.io import read_json, read_jsonl


def _config(tmp_path, model_dir):
    chat = tmp_path / "chat.jsonl"
    rows = [
        {"conversations": [{"from": "human", "value": f"Tell me something nice #{i}"},
                           {"from": "gpt", "value": "Sunsets over the sea are lovely. " * (1 + i % 4)}]}
        for i in range(24)
    ]
    chat.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
name: e2e
run_dir: {tmp_path / 'run'}
model: {model_dir}
data:
  max_length: 96
  sources:
    - {{name: {chat}, label: chat, train: 16, heldout: 4}}
    - {{name: gsm8k, train: 16, heldout: 4}}
score: {{batch_size: 8}}
smoothing: {{target_mean: 0.2}}
train: {{max_steps: 3, batch_size: 4, logging_steps: 1}}
eval: {{max_new_tokens: 8, batch_size: 4, mc_limit: 6, mc_samples: 2, clustering_texts: 6, clustering_top_k: 5, pairwise: ["ual:sft"], pairwise_source: chat, pairwise_limit: 3, pairwise_max_new_tokens: 8, answers_per_source: 2}}
""")
    return cfg


def test_every_stage_then_resume(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    for stage in ("data", "score", "map", "train", "eval", "report"):
        assert main([stage, "--config", str(cfg)]) == 0, stage

    samples = read_jsonl(run / "samples.jsonl")
    assert len(samples) == 32 and {s["source"] for s in samples} == {"chat", "gsm8k"}
    assert read_json(run / "scores_report" / "scores_report.json")["failures"] == 0
    scores = read_jsonl(run / "scores.jsonl")
    assert len(scores) == 32 and all(0 <= r["score"] <= 1 for r in scores)
    eps = [r["eps"] for r in read_jsonl(run / "smoothing.jsonl")]
    assert abs(sum(eps) / len(eps) - 0.2) < 1e-9
    for mode in ("sft", "ls", "ual"):
        result = read_json(run / "train" / mode / "result.json")
        assert result["steps"] == 3
        assert (run / "train" / mode / "adapter" / "adapter_config.json").exists()
    assert read_json(run / "train" / "ls" / "result.json")["mean_eps"] == pytest.approx(0.2)
    metrics = read_json(run / "metrics.json")
    assert set(metrics["eval"]) == {"base", "sft", "ls", "ual"}
    for name, e in metrics["eval"].items():
        assert set(e["nll"]) == {"chat", "gsm8k", "all"}
        assert e["maths"]["n_questions"] == 4
    # LoRA training moved the held-out NLL of each trained mode away from the base model's
    base_nll = metrics["eval"]["base"]["nll"]["all"]["nll"]
    assert all(metrics["eval"][m]["nll"]["all"]["nll"] != base_nll for m in ("sft", "ls", "ual"))
    assert all(e["multiple_choice"]["n_questions"] == 6 for e in metrics["eval"].values())
    clustering = read_json(run / "clustering.json")
    assert set(clustering["models"]) == {"base", "sft", "ls", "ual"}
    assert all(r["n_pairs"] == 10 and -1 <= r["mean_all_pairs"] <= 1 for r in clustering["models"].values())
    pairwise = read_json(run / "eval" / "pairwise.json")["comparisons"]["ual:sft"]
    assert pairwise["n_instructions"] == 3 and pairwise["wins"] + pairwise["ties"] + pairwise["losses"] == pairwise["n_valid"]
    # Answers generated once per model: the side-by-side prompts (2 per source) for every model, and the
    # pairwise prompts too for the two the judge compares; the judge read them from there.
    side = read_json(run / "eval" / "answers" / "side_by_side.json")
    assert side["sources"] == ["chat", "chat", "gsm8k", "gsm8k"] and set(side["cost"]) == {"base", "sft", "ls", "ual"}
    chat_ids = [r["id"] for r in read_jsonl(run / "heldout.jsonl") if r["source"] == "chat"]
    for model in ("base", "sft", "ls", "ual"):
        rows = read_json(run / "eval" / "answers" / f"{model}.json")
        assert set(rows[0]) >= {"instruction", "output", "generator", "id"} and len({r["id"] for r in rows}) == len(rows)
        wanted = set(side["ids"]) | (set(chat_ids[:3]) if model in ("ual", "sft") else set())
        assert {r["id"] for r in rows} == wanted and side["cost"][model]["prompts"] == len(wanted)
    # Per-item results of every model, consistent with its aggregates.
    heldout_ids = [r["id"] for r in read_jsonl(run / "heldout.jsonl")]
    for name, e in metrics["eval"].items():
        items = read_jsonl(run / "eval" / "items" / f"{name}.nll.jsonl")
        assert [r["id"] for r in items] == heldout_ids
        assert sum(r["nll"] for r in items) / sum(r["tokens"] for r in items) == pytest.approx(e["nll"]["all"]["nll"])
        tokens = np.load(run / "eval" / "items" / f"{name}.tokens.npz")
        assert tokens["confidence"].size == sum(r["tokens"] for r in items) == e["calibration"]["all"]["tokens"]
        assert len(read_jsonl(run / "eval" / "items" / f"{name}.mc.jsonl")) == 6
        assert len(read_jsonl(run / "eval" / "items" / f"{name}.maths.jsonl")) == 4
        assert 0 <= e["calibration"]["gsm8k"]["ece"] <= 1 and 0 <= e["multiple_choice"]["ece"] <= 1
    assert len(read_jsonl(run / "eval" / "items" / "pairwise.ual_vs_sft.prompts.jsonl")) == 3
    # Paired differences for every metric of the configured pairs, with the held-out u buckets.
    comp = read_json(run / "comparisons.json")
    assert set(comp["pairs"]) == {"ual:sft", "ual:ls"}
    rows = comp["pairs"]["ual:sft"]
    assert {"nll/all", "nll/chat", "nll/gsm8k", "ece/all", "mc/p_gold", "mc/accuracy", "mc/ece", "gsm8k/accuracy",
            "nll/u-q1", "ece/u-q4", "pairwise", "clustering/silhouette"} <= set(rows)
    for r in rows.values():
        assert r["low"] is None or r["low"] <= r["estimate"] <= r["high"]
    assert len(read_jsonl(run / "heldout_scores.jsonl")) == 8
    assert [b["items"] for b in comp["buckets"]["models"]["ual"]] == [2, 2, 2, 2]
    report = (run / "report.md").read_text()
    assert report.index("## Verdict") < report.index("## Data")
    for needle in ("## Calibration", "## Paired differences", "By uncertainty", "reliability.png"):
        assert needle in report
    for needle in ("## Pairwise comparison", "## Answers side by side", "## Feature clustering", "MC acc",
                   "clustering.png"):
        assert needle in report
    for needle in ("| base |", "| sft |", "| ls |", "| ual |", "scores.png", "smoothing.png", "loss.png"):
        assert needle in report
    for png in ("scores.png", "smoothing.png", "loss.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Rerunning training and evaluation reuses what is done.
    scored = (run / "scores.jsonl").stat().st_mtime_ns
    assert main(["score", "--config", str(cfg)]) == 0
    assert (run / "scores.jsonl").stat().st_mtime_ns == scored
    before = (run / "train" / "ual" / "result.json").stat().st_mtime_ns
    assert main(["train", "--config", str(cfg)]) == 0
    answered = (run / "eval" / "answers" / "ual.json").stat().st_mtime_ns
    assert main(["eval", "--config", str(cfg)]) == 0
    assert (run / "train" / "ual" / "result.json").stat().st_mtime_ns == before
    assert (run / "eval" / "answers" / "ual.json").stat().st_mtime_ns == answered  # not generated again


def test_bad_input_is_a_clear_error_and_input_untouched(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    content = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"instruction": "x"}\n'
    bad.write_text(content)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'r'}\nmodel: {tiny_model_dir}\ndata:\n  sources:\n    - {{name: {bad}}}\n")
    proc = subprocess.run([sys.executable, "-m", "ual.cli", "data", "--config", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "bad.jsonl:2" in proc.stderr and "output" in proc.stderr
    assert bad.read_text() == content


def test_map_refuses_missing_scores_unless_told(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    assert main(["data", "--config", str(cfg)]) == 0
    ids = [r["id"] for r in read_jsonl(run / "samples.jsonl")]
    from ual.io import write_jsonl

    write_jsonl(run / "scores.jsonl", [{"id": i, "source": "x", "score": 0.5, "scorer": "t", "details": {}} for i in ids[:-3]])
    assert main(["map", "--config", str(cfg)]) == 2
    assert main(["map", "--config", str(cfg), "--smoothing.missing", "drop"]) == 0
    dropped = read_jsonl(run / "smoothing.jsonl")
    assert [r["id"] for r in dropped] == ids[:-3]  # exactly the unscored ones are gone
    assert sum(r["eps"] for r in dropped) / len(dropped) == pytest.approx(0.2)
    assert main(["map", "--config", str(cfg), "--smoothing.missing", "mean"]) == 0
    rows = {r["id"]: r for r in read_jsonl(run / "smoothing.jsonl")}
    assert set(rows) == set(ids)
    # The unscored samples get the target mean, so the whole set keeps it; the scored ones are mapped as with drop.
    assert all(rows[i]["score"] is None and rows[i]["eps"] == pytest.approx(0.2) for i in ids[-3:])
    assert [rows[i]["eps"] for i in ids[:-3]] == pytest.approx([r["eps"] for r in dropped])
    assert sum(r["eps"] for r in rows.values()) / len(rows) == pytest.approx(0.2)


def test_a_machine_error_is_one_line_not_a_traceback(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A full disk (simulated: it cannot be made here) while `ual data` writes: exit 1 and one line naming it."""
    import ual.data.stage

    src = tmp_path / "chat.jsonl"
    src.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'r'}\nmodel: {tiny_model_dir}\ndata:\n  sources:\n    - {{name: {src}}}\n")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ual.data.stage, "write_json", full_disk)
    assert main(["data", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "ual data: error: [Errno 28] No space left on device" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "samples.jsonl").exists()
