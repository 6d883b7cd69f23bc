"""`ual score` as a user types it: --judge/--model/--base-url/--dry-run, scores kept per scorer,
the rank correlation between two scorers on the same run, and the scores section of the report.

The judge is a real HTTP endpoint on loopback (the scripted stub of judge_server.py, so the
answers are known); perplexity comes from the tiny random model.
"""

import json

import pytest
import yaml

from judge_server import StubJudge, completion
from ual.cli import main
from ual.io import read_json, read_jsonl


@pytest.fixture(autouse=True)
def _no_real_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("UAL_JUDGE_CACHE", raising=False)


def _config(tmp_path, model_dir):
    chat = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Write a short poem about the number {i}"},
                          {"role": "assistant", "content": "Softly the numbers fall. " * (1 + i % 5)}]}
            for i in range(12)]
    chat.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
run_dir: {tmp_path / 'run'}
model: {model_dir}
data: {{max_length: 64, sources: [{{name: {chat}, label: chat, train: 12}}]}}
score: {{batch_size: 4}}
""")
    return cfg


def _length_judge(body):
    """Answers a score that grows with the sample's length, so the two scorers' ranks can agree."""
    text = body["messages"][-1]["content"]
    return completion(str(min(99, len(text) // 20)))


def test_score_shortcuts_keep_each_scorer_and_compare_them(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    assert main(["data", str(cfg)]) == 0
    assert main(["score", str(cfg)]) == 0  # perplexity under the run's own (tiny) model
    ppl_rows = read_jsonl(run / "scores.jsonl")
    assert {r["scorer"] for r in ppl_rows} == {f"perplexity:{tiny_model_dir}"}
    assert len(list((run / "scores").glob("perplexity_*.jsonl"))) == 1

    with StubJudge(_length_judge) as stub:
        judge = ["score", str(cfg), "--judge", "openai", "--model", "judge-x", "--base-url", stub.base_url]
        capsys.readouterr()
        assert main(judge + ["--dry-run"]) == 0
        out = capsys.readouterr().out
        assert len(stub.log) == 0 and '"requests": 12' in out  # planned, nothing sent
        assert read_jsonl(run / "scores.jsonl") == ppl_rows  # and the scores untouched
        assert main(judge + ["--score.requests_per_minute", "6000", "--score.timeout_s", "30"]) == 0
        assert len(stub.log) == 12 and {e["body"]["model"] for e in stub.log} == {"judge-x"}
    # --model named the judge: the run's own model is unchanged in the saved config
    assert yaml.safe_load((run / "config.yaml").read_text())["model"] == str(tiny_model_dir)
    judged = read_jsonl(run / "scores.jsonl")
    assert {r["scorer"] for r in judged} == {"judge:judge-x:uncertainty-v1"} and all(r["score"] is not None for r in judged)

    rep = read_json(run / "scores_report" / "scores_report.json")
    (cmp,) = rep["rank_correlation"]
    assert cmp["scorer_a"] == "judge:judge-x:uncertainty-v1" and cmp["scorer_b"].startswith("perplexity:")
    assert cmp["n"] == 12 and -1 <= cmp["spearman"] <= 1
    assert (run / "scores_report" / cmp["plot"]).read_bytes()[:4] == b"\x89PNG"

    # Back to perplexity: reused from scores/, not recomputed, and it is what `ual map` reads again.
    assert main(["score", str(cfg)]) == 0
    assert read_jsonl(run / "scores.jsonl") == ppl_rows
    assert main(["analyze", "scores", str(run)]) == 0
    (cmp,) = read_json(run / "scores_report" / "scores_report.json")["rank_correlation"]
    assert cmp["scorer_a"].startswith("perplexity:") and cmp["scorer_b"] == "judge:judge-x:uncertainty-v1"

    assert main(["map", str(cfg)]) == 0
    assert main(["report", str(cfg)]) == 0
    report = (run / "report.md").read_text()
    assert "## Uncertainty scores" in report and "Spearman" in report
    assert "(scores_report/compare_0.png)" in report
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2  # the comparison plot inlined with the rest


def test_analyze_scores_against_a_file_and_a_missing_one(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    assert main(["data", str(cfg)]) == 0
    assert main(["score", str(cfg)]) == 0
    other = tmp_path / "other.jsonl"
    rows = read_jsonl(run / "scores.jsonl")
    other.write_text("".join(json.dumps({**r, "scorer": "reversed", "score": 1 - r["score"]}) + "\n" for r in rows))
    assert main(["analyze", "scores", str(run), "--compare", str(other)]) == 0
    (cmp,) = read_json(run / "scores_report" / "scores_report.json")["rank_correlation"]
    assert cmp["spearman"] == pytest.approx(-1.0)  # exactly reversed ranks
    assert main(["analyze", "scores", str(run), "--compare", str(tmp_path / "nope.jsonl")]) == 2
