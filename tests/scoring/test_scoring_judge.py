"""JudgeScorer against a scripted OpenAI-compatible stub on loopback (fast; the real server is in *_server.py).

The stub and the fault proxy are real HTTP servers, so the official client,
retries, time-outs and headers are exercised for real; only the model is fake.
"""

import dataclasses
import json
import logging
import math
import time

import pytest

from judge_server import FaultProxy, StubJudge, completion, reasoning_model, request_key, small_dataset
from ual.config import ScoreConfig
from ual.scoring.judge import JudgeFatalError, JudgeOptions, JudgeScorer, RateLimiter, build_judge_scorer, price_for

FAST = JudgeOptions(progress=False, timeout_s=2.0, backoff_base_s=0.05, backoff_max_s=0.2)


def digit_logprobs(tens=((7, 0.9), (8, 0.1)), units=((3, 1.0),)):
    lp = lambda p: math.log(p)
    first = {"token": str(tens[0][0]), "logprob": lp(tens[0][1]),
             "top_logprobs": [{"token": str(d), "logprob": lp(p)} for d, p in tens]}
    second = {"token": str(units[0][0]), "logprob": lp(units[0][1]),
              "top_logprobs": [{"token": str(d), "logprob": lp(p)} for d, p in units]}
    return [first, second]


def cfg(url, **kw):
    return ScoreConfig(scorer="judge", model=kw.pop("model", "gpt-4o-mini"), base_url=url, **kw)


@pytest.fixture(autouse=True)
def _no_real_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def test_scores_expected_value_and_rerun_sends_nothing(tmp_path):
    samples = small_dataset(5)
    with StubJudge(lambda body: completion("73", digit_logprobs())) as stub:
        s = JudgeScorer(cfg(stub.base_url), tmp_path / "c.sqlite", options=FAST)
        res = s.score(samples)
        assert [r.id for r in res] == [x.id for x in samples] and len(stub.log) == 5
        d = res[0].details
        assert d["sampled"] == 73 and d["expected"] == pytest.approx(0.9 * 73 + 0.1 * 83)
        assert res[0].score == pytest.approx(d["expected"] / 99) and d["cached"] is False
        body = stub.log[0]["body"]
        assert body["temperature"] == 0 and body["logprobs"] is True and body["top_logprobs"] == 20
        assert stub.log[0]["auth"] == "Bearer sk-no-key-required"  # local endpoint, no key: placeholder
        res2 = JudgeScorer(cfg(stub.base_url), tmp_path / "c.sqlite", options=FAST).score(samples)
        assert len(stub.log) == 5 and all(r.details["cached"] for r in res2)
        assert [r.score for r in res2] == [r.score for r in res]


def test_a_thinking_judge_is_scored_on_its_answer_not_its_thinking(tmp_path):
    """A reasoning model served without a reasoning parser writes "<think>...</think>" into the answer: the
    numbers in there are not the score, and the log-probabilities are read at the answer's digits."""
    think = [{"token": t, "logprob": 0.0, "top_logprobs": [{"token": t, "logprob": 0.0}]}
             for t in ("<think>", "Maybe 20, or 40", "</think>", "\n")]
    with StubJudge(lambda body: completion("<think>Maybe 20, or 40</think>\n73", think + digit_logprobs())) as stub:
        res = JudgeScorer(cfg(stub.base_url), tmp_path / "c.sqlite", options=FAST).score(small_dataset(1))
    d = res[0].details
    assert d["sampled"] == 73 and d["expected"] == pytest.approx(0.9 * 73 + 0.1 * 83) and d["attempts"] == 1


def test_garbage_answers_are_retried_then_listed_never_defaulted(tmp_path):
    answers = {}

    def answer(body):
        k = request_key(body)
        answers[k] = answers.get(k, 0) + 1
        if "autumn leaves" in json.dumps(body):
            return completion("I'm sorry, I cannot rate this.")
        return completion("Score: 150" if answers[k] == 1 else "64")

    samples = small_dataset(3)
    with StubJudge(answer) as stub:
        s = JudgeScorer(cfg(stub.base_url, max_retries=2), tmp_path / "c.sqlite", options=FAST)
        res = s.score(samples)
        poem = res[0]
        assert poem.score is None and "refusal" in poem.details["error"] and len(poem.details["reasons"]) == 3
        for r in res[1:]:
            assert r.details["sampled"] == 64 and r.details["attempts"] == 2 and r.details["expected"] is None
        temps = [b["body"]["temperature"] for b in stub.log if request_key(b["body"]) == request_key(stub.log[-1]["body"])]
        assert temps[0] == 0 and all(t > 0 for t in temps[1:])  # a greedy retry would repeat itself
        n = len(stub.log)
        again = JudgeScorer(cfg(stub.base_url, max_retries=0), tmp_path / "c.sqlite", options=FAST).score(samples)
        assert len(stub.log) == n + 1  # only the failed sample is retried on a rerun
        assert again[0].score is None and again[1].details["cached"]


def test_faults_end_scored_or_listed_and_no_paid_duplicate(tmp_path):
    faults = ["delay", "drop", "429", "500", "garbage", "hang", None, "500"]
    order = {}

    def plan(key, attempt):  # the first attempt of the i-th sample to arrive gets faults[i]
        order.setdefault(key, len(order))
        return faults[order[key] % len(faults)] if attempt == 0 else None

    samples = small_dataset(8)
    with StubJudge(lambda b: completion("30", digit_logprobs(((3, 1.0),), ((0, 1.0),)))) as stub, \
            FaultProxy(stub.base_url, plan, hang_s=3.0) as proxy:
        s = JudgeScorer(cfg(proxy.base_url, concurrency=4), tmp_path / "c.sqlite", options=FAST)
        res = s.score(samples)
        assert all(r.ok for r in res) and all(r.details["score_0_99"] == 30 for r in res)
        delivered = {}
        for row in proxy.log:
            delivered[row["key"]] = delivered.get(row["key"], 0) + row["delivered"]
        assert sorted(delivered.values()) == [1] * 8  # each sample paid for exactly once
        for key in {r["key"] for r in proxy.log if r["fault"] == "429"}:
            t429 = next(r["t"] for r in proxy.log if r["key"] == key and r["fault"] == "429")
            nxt = next(r["t"] for r in proxy.log if r["key"] == key and r["attempt"] == 1)
            assert nxt - t429 >= 0.95  # Retry-After: 1 honoured
        n = len(proxy.log)
        JudgeScorer(cfg(proxy.base_url), tmp_path / "c.sqlite", options=FAST).score(samples)
        assert len(proxy.log) == n


def test_exhausted_retries_are_listed_with_every_reason(tmp_path):
    with StubJudge() as stub, FaultProxy(stub.base_url, lambda k, a: ["500", "garbage", "drop"][a % 3]) as proxy:
        res = JudgeScorer(cfg(proxy.base_url, max_retries=2), tmp_path / "c.sqlite", options=FAST).score(small_dataset(1))
        assert res[0].score is None and len(res[0].details["reasons"]) == 3 and len(proxy.log) == 3
        assert "500" in res[0].details["reasons"][0]


def test_api_key_never_written_anywhere(tmp_path, monkeypatch, caplog, capsys):
    secret = "sk-test-SECRETKEY0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    caplog.set_level(logging.DEBUG)
    faults = {0: "echo_auth", 1: "echo_auth"}
    with StubJudge(lambda b: completion("50")) as stub, FaultProxy(stub.base_url, lambda k, a: faults.get(a)) as proxy:
        s = JudgeScorer(cfg(proxy.base_url, max_retries=1), tmp_path / "c.sqlite", options=FAST)
        res = s.score(small_dataset(2))
        assert stub.log == [] and all(r.score is None for r in res)  # both attempts echoed the key back
        assert proxy.log and all(r["fault"] == "echo_auth" for r in proxy.log)
        res = JudgeScorer(cfg(proxy.base_url, max_retries=2), tmp_path / "c.sqlite", options=FAST).score(small_dataset(2))
        assert all(r.ok for r in res) and stub.log[0]["auth"] == f"Bearer {secret}"  # it was really sent
    dump = json.dumps([r.details for r in res]) + caplog.text + "".join(capsys.readouterr())
    for f in tmp_path.iterdir():
        dump += f.read_bytes().decode("latin-1")
    assert "SECRETKEY" not in dump and secret not in dump
    assert "Bearer ***" in dump or "sk-***" in dump  # the echoed header was kept, scrubbed


def test_dry_run_sends_nothing_and_prices(tmp_path, capsys):
    with StubJudge() as stub:
        s = JudgeScorer(cfg(stub.base_url, dry_run=True, n_samples=2), tmp_path / "c.sqlite", options=FAST)
        res = s.score(small_dataset(4))
        assert stub.log == [] and all(r.score is None and "dry run" in r.details["error"] for r in res)
        assert s.last_plan["requests"] == 8 and s.last_plan["est_cost_usd"] > 0
        assert "8 requests" in capsys.readouterr().out
        unknown = JudgeScorer(cfg(stub.base_url, model="my-local-llama"), tmp_path / "c.sqlite", options=FAST)
        assert unknown.plan(small_dataset(4))["est_cost_usd"] is None and stub.log == []
    assert price_for("gpt-4o-2024-08-06") == price_for("gpt-4o") != price_for("gpt-4o-mini-2024-07-18")
    assert price_for("llama") is None and price_for("gpt-5-mini-2025-08-07") == price_for("gpt-5-mini") != price_for("gpt-5")


def test_n_samples_average_and_logprobs_refused(tmp_path):
    def answer(body):
        if body.get("logprobs"):
            return 400, {"error": {"message": "logprobs is not supported by this model"}}
        return completion("20" if body["temperature"] == 0 else "40")

    with StubJudge(answer) as stub:
        res = JudgeScorer(cfg(stub.base_url, n_samples=3), tmp_path / "c.sqlite", options=FAST).score(small_dataset(2))
        d = res[0].details
        assert d["score_0_99"] == pytest.approx((20 + 40 + 40) / 3) and len(d["draws"]) == 3
        assert [x["temperature"] for x in d["draws"]] == [0, 0.7, 0.7]


def test_a_reasoning_model_is_asked_the_way_it_accepts(tmp_path, caplog):
    """OpenAI's reasoning models refuse max_tokens, temperature 0 and log-probabilities with a 400 each: the run
    learns each refusal once (a warning per field), asks again at once, and those requests are not attempts."""
    c = cfg(None, model="gpt-5-mini", max_tokens=500, max_retries=0, concurrency=2, n_samples=2)
    with StubJudge(reasoning_model("Score: 37")) as stub:
        c.base_url = stub.base_url
        opts = dataclasses.replace(JudgeOptions.from_config(c), progress=False)
        with caplog.at_level(logging.WARNING):
            res = JudgeScorer(c, tmp_path / "c.sqlite", options=opts).score(small_dataset(4))
        bodies = [r["body"] for r in stub.log]
    assert [r.score for r in res] == [pytest.approx(37 / 99)] * 4
    assert all(r.details["attempts"] == 1 and [d["temperature"] for d in r.details["draws"]] == [None, None]
               for r in res)
    accepted = [b for b in bodies if b.get("max_completion_tokens") == 500 and "temperature" not in b
                and "logprobs" not in b and "top_logprobs" not in b and "max_tokens" not in b]
    assert len(accepted) == 8 and len(bodies) - len(accepted) <= 3 * 2  # each field refused once per request in flight
    warned = [r.getMessage() for r in caplog.records if "endpoint refused" in r.getMessage()]
    assert len(warned) == 3 and all(any(f"refused {f};" in w for w in warned)
                                    for f in ("max_tokens", "temperature", "logprobs")), warned


def test_a_token_budget_spent_thinking_fails_the_sample_with_the_reason(tmp_path):
    """With the default budget (16 tokens) a reasoning model answers nothing: each sample fails at its first
    answer, not retried (the same budget would end the same way), saying what to raise."""
    with StubJudge(reasoning_model("Score: 37")) as stub:
        c = cfg(stub.base_url, model="gpt-5-mini", max_retries=3)
        res = JudgeScorer(c, tmp_path / "c.sqlite", options=FAST).score(small_dataset(3))
        answered = [r for r in stub.log if r["body"].get("max_completion_tokens") == 16
                    and not {"temperature", "logprobs"} & r["body"].keys()]
    assert all(r.score is None and "hit the token limit before any text" in r.details["error"]
               and "max_tokens" in r.details["error"] for r in res)
    assert len(answered) == 3  # one answer per sample: no retry


def test_score_max_tokens_reaches_the_requests(tmp_path):
    with StubJudge(lambda b: completion("12")) as stub:
        scorer = build_judge_scorer(cfg(stub.base_url, max_tokens=300, timeout_s=7.0), tmp_path)
        scorer.opts.progress = False
        scorer.score(small_dataset(1))
    assert stub.log[0]["body"]["max_tokens"] == 300 and scorer.opts.timeout_s == 7.0


def test_a_404_from_a_base_url_without_v1_suggests_it(tmp_path):
    not_found = (404, {"error": {"message": "Not Found", "type": "not_found_error"}})
    with StubJudge(lambda b: not_found) as stub:
        root = stub.base_url.removesuffix("/v1")
        for url, hinted in ((root, True), (stub.base_url, False)):
            with pytest.raises(JudgeFatalError) as e:
                JudgeScorer(cfg(url), tmp_path / "c.sqlite", options=FAST).score(small_dataset(1))
            assert (f"answer under /v1: {root}/v1?" in str(e.value)) is hinted, str(e.value)


def test_auth_error_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-000000000")
    with StubJudge(lambda b: (401, {"error": {"message": "Incorrect API key provided: sk-wrong-000000000"}})) as stub:
        with pytest.raises(JudgeFatalError) as e:
            JudgeScorer(cfg(stub.base_url), tmp_path / "c.sqlite", options=FAST).score(small_dataset(2))
        assert "sk-wrong-000000000" not in str(e.value)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(JudgeFatalError, match="OPENAI_API_KEY"):  # OpenAI itself, no key: refuse before sending
        JudgeScorer(cfg(None), tmp_path / "c.sqlite", options=FAST).score(small_dataset(1))


def test_rate_limiter_spaces_requests():
    import asyncio

    async def go():
        lim = RateLimiter(rpm=120, tpm=None)  # 2/s, burst of 20
        t = time.monotonic()
        for _ in range(24):
            await lim.acquire(10)
        return time.monotonic() - t

    assert 1.5 < asyncio.run(go()) < 8.0  # at least the spacing; the upper bound only catches over-throttling


def test_build_judge_scorer(tmp_path, monkeypatch):
    monkeypatch.delenv("UAL_JUDGE_CACHE", raising=False)
    s = build_judge_scorer(cfg("http://127.0.0.1:9/v1"), tmp_path)
    assert s.cache.path == tmp_path / "judge_cache.sqlite" and s.name == "judge:gpt-4o-mini:uncertainty-v1"
    monkeypatch.setenv("UAL_JUDGE_CACHE", str(tmp_path / "shared.sqlite"))
    assert build_judge_scorer(cfg("http://127.0.0.1:9/v1"), tmp_path).cache.path == tmp_path / "shared.sqlite"


def test_identical_samples_are_asked_once(tmp_path):
    s = small_dataset(2)
    with StubJudge(lambda b: completion("12")) as stub:
        res = JudgeScorer(cfg(stub.base_url), tmp_path / "c.sqlite", options=FAST).score([s[0], s[1], s[0]])
        assert len(stub.log) == 2 and res[0].score == res[2].score == pytest.approx(12 / 99)


def test_retry_after_headers():
    from ual.scoring.judge_http import retry_after as _retry_after

    class E:
        def __init__(self, headers):
            self.response = type("R", (), {"headers": headers})()

    assert _retry_after(E({"retry-after": "2"})) == 2.0 and _retry_after(E({"retry-after-ms": "1500"})) == 1.5
    assert _retry_after(E({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0  # a date in the past
    assert _retry_after(E({})) is None and _retry_after(ValueError("x")) is None


def test_plan_over_a_sample_file_is_the_plan_over_the_samples(tmp_path):
    """`ual score` hands the judge its samples as a SampleFile (read from disk, prompts rendered one at a time,
    never all kept): the plan, its shards included, is the plan made over the same samples in a list."""
    from ual.sample_file import SampleFile

    samples = small_dataset(30)
    samples += samples[:5]  # identical samples are asked once
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in samples), encoding="utf-8")
    plans = []
    for given in (samples, SampleFile(path)):
        s = JudgeScorer(cfg("http://127.0.0.1:9/v1", via="batch", n_samples=2, batch_max_lines=7),
                        tmp_path / "c.sqlite", options=FAST)
        plans.append(s.plan(given))
    assert plans[0] == plans[1] and plans[0]["requests"] == 2 * len({s.id for s in samples})
    assert [sh["requests"] for sh in plans[0]["shards"]] == [7] * 8 + [4]
