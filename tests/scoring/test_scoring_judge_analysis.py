"""Scores report: histograms per source, failures with reasons, Spearman between two scorers."""

import json

import pytest

from ual.io import write_jsonl
from ual.scoring.analysis import failures, rank_correlation, scores_report, summarize


def rows(scorer, values, source=lambda i: "chat" if i % 2 else "maths"):
    out = []
    for i, v in enumerate(values):
        details = {} if v is not None else {"error": f"unparseable answer: out of range: {100 + i}"}
        out.append({"id": f"s{i}", "source": source(i), "score": v, "scorer": scorer, "details": details})
    return out


def test_report_writes_histograms_failures_and_correlation(tmp_path):
    judge = rows("judge:gpt-4o:uncertainty-v1", [0.1, 0.8, 0.2, 0.9, None, 0.7, 0.15, None])
    ppl = rows("perplexity:smollm2-135m", [0.3, 0.6, 0.35, 0.9, 0.5, 0.5, 0.1, 0.2])
    write_jsonl(tmp_path / "judge.jsonl", judge)
    write_jsonl(tmp_path / "ppl.jsonl", ppl)
    rep = scores_report(tmp_path / "judge.jsonl", tmp_path / "report", compare_with=[tmp_path / "ppl.jsonl"])
    assert rep["failures"] == 2 and rep["failure_reasons"] == {"unparseable answer: out of range": 2}
    assert set(rep["histograms"]) == {"hist_chat.png", "hist_maths.png", "hist_all.png"}
    for name in rep["histograms"]:
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"
    corr = rep["rank_correlation"][0]
    assert corr["n"] == 6 and corr["failed_either"] == 2 and corr["scorer_b"] == "perplexity:smollm2-135m"
    assert 0.5 < corr["spearman"] <= 1.0
    saved = json.loads((tmp_path / "report" / "scores_report.json").read_text())
    assert saved["summary"]["maths"]["failed"] == 1 and saved["summary"]["chat"]["failed"] == 1 and saved["summary"]["all"]["scored"] == 6
    listed = [json.loads(x) for x in (tmp_path / "report" / "failures.jsonl").read_text().splitlines()]
    assert {x["id"] for x in listed} == {"s4", "s7"} and all("out of range" in x["error"] for x in listed)


def test_spearman_is_a_rank_correlation():
    a = rows("a", [0.1, 0.2, 0.3, 0.4, 0.5])
    b = rows("b", [1.0, 4.0, 9.0, 16.0, 25.0])  # monotone, not linear
    assert rank_correlation(a, b)["spearman"] == pytest.approx(1.0)
    c = rows("c", [0.5, 0.4, 0.3, 0.2, 0.1])
    assert rank_correlation(a, c)["spearman"] == pytest.approx(-1.0)
    assert rank_correlation(a, rows("d", [0.3] * 5))["spearman"] is None  # constant: undefined, said so
    assert rank_correlation(a[:2], b[:2])["spearman"] is None


def test_summary_and_failures_on_empty_source():
    r = rows("x", [None, None])
    s = summarize(r)
    assert s["all"] == {"n": 2, "scored": 0, "failed": 2}
    listed, kinds = failures(r)
    assert len(listed) == 2 and sum(kinds.values()) == 2
