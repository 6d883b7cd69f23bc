"""JudgeScorer against the REAL llama.cpp server (llama-cpp-python[server]) serving SmolLM2-135M on loopback.

SmolLM2-135M is a poor judge: it often answers with something that is not a
score. That is useful here: the parser, the retries and the failure list all
run against real answers. What the tests demand is the contract: every sample
ends scored or listed with a reason, nothing is paid for twice, and a SIGKILL
loses at most what was in flight.
Skipped (with the install command) only when llama-cpp-python is not
installed; set UAL_REQUIRE_JUDGE_SERVER=1 to make that a failure instead (CI).
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from judge_server import FaultProxy, chat_run_folder, request_key, small_dataset
from ual.config import ScoreConfig
from ual.scoring.cache import JudgeCache
from ual.scoring.judge import JudgeOptions, JudgeScorer, _content_hash
from ual.scoring.prompt import default_prompt, parse_answer
from ual.scoring.unscored import EXIT_UNSCORED

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-q4_1"
# the server runs one request at a time and this machine may be busy: generous time-outs
OPTS = JudgeOptions(progress=False, timeout_s=600, backoff_base_s=0.2, backoff_max_s=2)


def keys_of(samples):
    """(proxy request key, cache content hash) per sample."""
    out = []
    for s in samples:
        msgs, _ = default_prompt().render(s.messages)
        out.append((request_key({"messages": msgs}), _content_hash(msgs)))
    return out


def check_contract(results):
    for r in results:
        assert r.ok or r.details.get("error"), r
        if r.ok:
            d = r.details
            assert 0 <= r.score <= 1 and 0 <= d["sampled"] <= 99
            assert d["expected"] is not None and 0 <= d["expected"] <= 99  # llama.cpp returns top_logprobs
            assert r.score == pytest.approx(d["expected"] / 99)
        else:
            assert r.details["reasons"]


def test_scores_a_small_dataset(server, tmp_path):
    samples = small_dataset(4)
    cfg = ScoreConfig(scorer="judge", model=MODEL, base_url=server.base_url, concurrency=2, max_retries=1)
    s = JudgeScorer(cfg, tmp_path / "c.sqlite", options=OPTS)
    res = s.score(samples)
    check_contract(res)
    print({x.messages[0]["content"][:25]: (r.details.get("answer"), r.details.get("expected"), r.details.get("error"))
           for x, r in zip(samples, res)})
    assert s.stats["prompt_tokens"] > 0 and s.stats["cost_usd"] is None  # unknown model: tokens only
    n = s.stats["requests"]
    again = JudgeScorer(cfg, tmp_path / "c.sqlite", options=OPTS)
    res2 = again.score([x for x, r in zip(samples, res) if r.ok])
    assert again.stats["requests"] == 0 and all(r.details["cached"] for r in res2) and n >= 4


def test_faults_through_proxy(server, tmp_path):
    samples = small_dataset(6, tag="f")
    faults = ["delay", "drop", "429", "500", "garbage", None]
    order = {}

    def plan(key, attempt):
        order.setdefault(key, len(order))
        return faults[order[key]] if attempt == 0 else None

    with FaultProxy(server.base_url, plan) as proxy:
        cfg = ScoreConfig(scorer="judge", model=MODEL, base_url=proxy.base_url, concurrency=3, max_retries=3)
        res = JudgeScorer(cfg, tmp_path / "c.sqlite", options=OPTS).score(samples)
        check_contract(res)
        log = list(proxy.log)
        assert {r["fault"] for r in log} >= {"delay", "drop", "429", "500", "garbage"}
        for (key, _), r in zip(keys_of(samples), res):
            rows = [x for x in log if x["key"] == key]
            good = [x for x in rows if x["delivered"] and parse_answer(x["content"]).value is not None]
            assert len(good) == (1 if r.ok else 0), rows  # a good answer is never bought twice
            if r.ok:
                assert rows[-1] is good[0]  # ... and nothing was asked after it
        t429 = [x for x in log if x["fault"] == "429"][0]
        nxt = next(x for x in log if x["key"] == t429["key"] and x["attempt"] == 1)
        assert nxt["t"] - t429["t"] >= 0.95  # Retry-After honoured
        n = len(proxy.log)
        JudgeScorer(cfg, tmp_path / "c.sqlite", options=OPTS).score([x for x, r in zip(samples, res) if r.ok])
        assert len(proxy.log) == n


def test_sigkill_midrun_then_rerun(server, tmp_path):
    n, conc = 6, 2
    samples = small_dataset(n)  # what `judge_server.py score --n 6` scores
    keys = keys_of(samples)
    cache_path = tmp_path / "c.sqlite"
    script = Path(__file__).resolve().parents[1] / "judge_server.py"
    with FaultProxy(server.base_url) as proxy:
        cmd = [sys.executable, str(script), "score", "--base-url", proxy.base_url, "--cache", str(cache_path),
               "--n", str(n), "--concurrency", str(conc), "--model", MODEL]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            if cache_path.exists() and JudgeCache(cache_path).count() >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"finished before the kill: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first_run = list(proxy.arrivals)  # everything that reached the proxy, answered or still in flight
        rows = JudgeCache(cache_path).lookup(MODEL, default_prompt().version, [h for _, h in keys])
        answered = {k for k, h in keys if rows.get((h, 0), {}).get("ok")}
        stored = {k for k, h in keys if (h, 0) in rows}
        assert stored and len(stored) < n, "killed mid-run"
        lost = set(first_run) - stored
        assert len(lost) <= conc  # only what was in flight
        mark = len(proxy.arrivals)
        cfg = ScoreConfig(scorer="judge", model=MODEL, base_url=proxy.base_url, concurrency=conc, max_retries=3)
        res = JudgeScorer(cfg, cache_path, options=OPTS).score(samples)
        second_run = proxy.arrivals[mark:]
    assert not answered & set(second_run)  # nothing committed was asked again
    check_contract(res)
    final = JudgeCache(cache_path).lookup(MODEL, default_prompt().version, [h for _, h in keys])
    for (k, h), r in zip(keys, res):
        assert (h, 0) in final
        if k in answered:
            assert r.details["cached"] and r.details["score_0_99"] == rows[(h, 0)]["score"]
    print(json.dumps({"first_run_requests": len(first_run), "answered_before_kill": len(answered),
                      "lost_in_flight": len(lost), "second_run_requests": len(second_run)}))


def test_the_readme_judge_commands_in_order_score_on_the_second(server, tmp_path, tiny_model_dir):
    """README, "Uncertainty from a judge LLM": a dry run, then the real run with rate limits. The dry run
    changes no file (not config.yaml, no cache), so the second command scores; its one-off limits are not
    recorded, its scorer is."""
    import yaml

    from ual.cli import main
    from ual.io import read_jsonl

    run = chat_run_folder(tmp_path, tiny_model_dir, [f"Name a colour #{i}" for i in range(3)])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    judge = ["--judge", "openai", "--model", MODEL, "--base-url", server.base_url]
    assert main(["score", str(run), *judge, "--dry-run"]) == 0
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    code = main(["score", str(run), *judge, "--score.concurrency", "2", "--score.requests_per_minute", "500"])
    rows = read_jsonl(run / "scores.jsonl")
    assert len(rows) == 3 and all(r["scorer"] == f"judge:{MODEL}:{default_prompt().version}" for r in rows)
    assert sum(r["score"] is not None for r in rows) >= 2  # a 135M judge may refuse one; never a default
    assert code == (EXIT_UNSCORED if any(r["score"] is None for r in rows) else 0)  # and then says so
    recorded = yaml.safe_load((run / "config.yaml").read_text())["score"]
    assert recorded["scorer"] == "judge" and recorded["model"] == MODEL and recorded["dry_run"] is False
    assert recorded["concurrency"] == ScoreConfig().concurrency and recorded["requests_per_minute"] is None
    with JudgeCache(run / "judge_cache.sqlite") as cache:
        answered = cache.count(judge=MODEL)
    code = main(["score", str(run)])  # the folder's scorer again: every answer is cached, nothing is asked
    assert code == (EXIT_UNSCORED if any(r["score"] is None for r in read_jsonl(run / "scores.jsonl")) else 0)
    with JudgeCache(run / "judge_cache.sqlite") as cache:
        assert cache.count(judge=MODEL) == answered
