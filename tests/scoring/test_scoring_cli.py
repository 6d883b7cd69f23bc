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
from ual.scoring.unscored import EXIT_UNSCORED


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


def test_samples_a_local_scorer_leaves_unscored_exit_3_and_map_goes_on_without_them(tmp_path, tiny_model_dir,
                                                                                        capsys):
    """Perplexity cannot score a sample whose response starts past score.max_length: the others are kept,
    `ual score` exits 3 saying how many, why and what to do, and `ual map --smoothing.missing drop` goes on."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Hi " * (1 if i < 4 else 60)},
                                                     {"role": "assistant", "content": f"Hello number {i}."}]}) + "\n"
                            for i in range(6)))
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nmodel: {tiny_model_dir}\n"
                   f"data: {{max_length: 256, sources: [{{name: {chat}, label: chat, train: 6}}]}}\n")
    assert main(["data", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["score", str(cfg), "--score.max_length", "60"]) == EXIT_UNSCORED
    out, err = capsys.readouterr()
    summary = json.loads(out[out.index("{"):])
    assert (summary["scored"], summary["failed"], summary["unscored"]) == (4, 2, 2)
    assert err.splitlines()[-1] == (
        "ual score: 2 sample(s) left without a score (2 training, 0 held-out): no response tokens left after "
        "truncation (x2). Next: change what the reasons name (a larger --score.max_length for a sample cut "
        "before its response) and run the same command again; or let `ual map` go on without them: --smoothing.missing drop (leave them out of training with smoothing) or "
        "mean (give them the mean score)")
    rows = read_jsonl(tmp_path / "run" / "scores.jsonl")
    assert sum(r["score"] is None and r["details"]["error"] == "no response tokens left after truncation"
               for r in rows) == 2
    assert main(["map", str(cfg)]) == 2  # smoothing.missing error: told, not guessed
    assert main(["map", str(cfg), "--smoothing.missing", "drop"]) == 0
    assert len(read_jsonl(tmp_path / "run" / "smoothing.jsonl")) == 4
