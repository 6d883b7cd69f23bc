"""Pairwise win rate: both orders, ties, invalid verdicts, length control, the two judges (the endpoint one
over real HTTP: retries, Retry-After, failures, 401/404 in one line, the key never shown), export."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from judge_server import DROP, StubJudge, completion, error_replies, per_attempt
from ual.evaluation.pairwise import (
    LocalPairwiseJudge,
    OpenAIPairwiseJudge,
    export_alpaca_eval,
    length_controlled_win_rate,
    pairwise_win_rate,
    parse_verdict,
)
from ual.scoring.judge_http import JudgeFatalError


@pytest.mark.parametrize("text, verdict", [
    ("A", "A"), (" b.", "B"), ("Response A", "A"), ("[[B]]", "B"), ("Tie", "tie"), ("tie.", "tie"),
    ("I prefer Response B because it is clearer.", "B"), ("Both Response A and Response B are fine", None),
    ("", None), (None, None), ("maybe", None),
    ("<think>Response A is shorter, but Response B is right.</think>\nB", "B"),  # the thinking does not count
    ("<think>Response A is better", None),  # cut while reasoning
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def _quality_judge(instruction, a, b):
    """Prefers the answer that says 'good'; tie when both or neither do."""
    ga, gb = "good" in a, "good" in b
    return "tie" if ga == gb else "A" if ga else "B"


def test_win_rate_counts_wins_losses_ties():
    instr = [f"q{i}" for i in range(5)]
    a = ["good", "good", "bad", "good", "bad"]
    b = ["bad", "good", "good", "bad", "bad"]
    out = pairwise_win_rate(instr, a, b, _quality_judge)
    assert (out["wins"], out["losses"], out["ties"]) == (2, 1, 2)
    assert out["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1 + 0.5) / 5)
    assert out["position_consistency"] == 1.0 and out["n_invalid"] == 0
    assert [r["preference_a"] for r in out["records"]] == [1.0, 0.5, 0.0, 1.0, 0.5]


def test_both_orders_cancel_position_bias():
    first = lambda i, a, b: "A"  # noqa: E731 - always picks whatever is shown first
    out = pairwise_win_rate(["q"] * 4, ["x"] * 4, ["y y"] * 4, first)
    assert out["win_rate"] == 0.5 and out["ties"] == 4 and out["first_position_rate"] == 1.0
    assert out["position_consistency"] == 0.0
    one_order = pairwise_win_rate(["q"] * 4, ["x"] * 4, ["y"] * 4, first, both_orders=False)
    assert one_order["win_rate"] == 1.0  # what a single order would have claimed


def test_invalid_verdicts_are_excluded_and_counted():
    judge = lambda i, a, b: None if i == "broken" else _quality_judge(i, a, b)  # noqa: E731
    out = pairwise_win_rate(["broken", "ok"], ["good", "good"], ["bad", "bad"], judge)
    assert out["n_invalid"] == 1 and out["n_valid"] == 1 and out["win_rate"] == 1.0
    none = pairwise_win_rate(["broken"], ["a"], ["b"], judge)
    assert none["win_rate"] is None and none["lc_win_rate"] is None


def _noisy_length_judge(instruction, a, b):
    """Prefers the longer answer, flipped for ~30% of (instruction, order) pairs; no quality signal."""
    flip = int(hashlib.sha256(f"{instruction}|{a}|{b}".encode()).hexdigest(), 16) % 10 < 3
    longer_first = len(a.split()) > len(b.split())
    return "A" if longer_first != flip else "B"


def test_length_control_removes_a_pure_length_preference():
    n = 600
    instr = [f"q{i}" for i in range(n)]
    # model A is longer in 80% of instructions, by 1..20 words
    a = [" ".join(["w"] * (10 + (i % 20 + 1 if i % 5 else -(i % 20 + 1)))) for i in range(n)]
    b = [" ".join(["w"] * 10)] * n
    out = pairwise_win_rate(instr, a, b, _noisy_length_judge)
    assert out["win_rate"] > 0.58  # the judge's length bias inflates A
    assert abs(out["lc_win_rate"] - 0.5) < 0.08 and out["lc_method"].startswith("logistic")


def test_length_control_keeps_a_quality_preference():
    prefs = [1.0] * 70 + [0.0] * 30
    diffs = [(-1) ** i * (i % 7) for i in range(100)]  # lengths unrelated to preference
    lc, method = length_controlled_win_rate(prefs, diffs)
    assert lc == pytest.approx(0.7, abs=0.05) and method.startswith("logistic")
    assert length_controlled_win_rate([1.0, 1.0], [3, 5]) == (1.0, "raw (no length spread or one outcome class)")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer


def test_local_judge_reads_the_letter_probabilities(tiny):
    import torch

    model, tok = tiny
    judge = LocalPairwiseJudge(model, tok, batch_size=2)
    triples = [("Say hi", "hi", "hello there"), ("Add 2+2", "4", "5"), ("Name a colour", "blue", "a dog")]
    margins = judge.margins(triples)
    assert all(isinstance(m, float) and m != 0 for m in margins)
    assert judge.judge_many(triples) == [judge(*t) for t in triples] == ["A" if m > 0 else "B" for m in margins]
    # strongly bias the letter "A": every verdict is A, so both orders make every instruction a tie
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.convert_tokens_to_ids("A")] = 30.0
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        out = pairwise_win_rate([t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples], judge)
    finally:
        handle.remove()
    assert out["win_rate"] == 0.5 and out["ties"] == 3 and out["first_position_rate"] == 1.0
    assert LocalPairwiseJudge(model, tok, tie_margin=1e9)("q", "a", "b") == "tie"


# ---------------------------------------------------------------------- the endpoint judge, over real HTTP
# OpenAIPairwiseJudge talks to judge_server.StubJudge, a loopback OpenAI-compatible server, through the
# package's judge client (ual.scoring.judge_http): no mocks. The key (not shaped like "sk-...", so only exact
# redaction catches it) is echoed back by the server in its 401.

KEY = "ual-pairwise-key-7d2e4a9c1b"
MODEL = "gpt-4o-mini"
_ERRORS = error_replies(KEY, MODEL)
ERROR_500, RATE_429, BAD_REQUEST_400, AUTH_401, NOT_FOUND_404 = (_ERRORS[s] for s in ("500", "429", "400", "401", "404"))


def verdict_answer(body) -> dict:
    """The judge: prefers the response that says 'good' (ties go to B)."""
    a = body["messages"][-1]["content"].split("[Response A]")[1].split("[Response B]")[0]
    return completion("Response A" if "good" in a else "B")


OK = verdict_answer


def pairwise_judge(stub, **kw):
    return OpenAIPairwiseJudge(MODEL, base_url=stub.base_url, **{"backoff_base_s": 0.05, "timeout": 10.0, **kw})


def per_prompt(log) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in log:
        out.setdefault(r["key"], []).append(r["t"])
    return out


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def test_openai_judge_against_a_local_server(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a base_url endpoint needs no key
    with StubJudge(verdict_answer) as stub:
        judge = pairwise_judge(stub, cache_path=tmp_path / "cache.sqlite")
        out = pairwise_win_rate(["q1", "q2", "q3"], ["good", "bad", "good"], ["bad", "good", "good"], judge)
        assert (out["wins"], out["losses"], out["ties"]) == (1, 1, 1) and out["win_rate"] == 0.5
        calls = len(stub.log)
        assert calls == 5  # q3 shows the same two answers in both orders: one prompt, asked once
        again = pairwise_win_rate(["q1", "q2", "q3"], ["good", "bad", "good"], ["bad", "good", "good"], judge)
        assert again["win_rate"] == 0.5 and len(stub.log) == calls  # every answer came from the cache
        assert all(r["body"]["temperature"] == 0 and r["body"]["model"] == MODEL for r in stub.log)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        OpenAIPairwiseJudge("gpt-4o")  # the OpenAI API itself: no key, said before any request


@pytest.mark.parametrize("first", [ERROR_500, RATE_429, DROP], ids=["500", "429_retry_after", "dropped"])
def test_transient_failure_is_retried_then_judged(first, key, caplog):
    caplog.set_level("DEBUG")
    with StubJudge(per_attempt(first, OK)) as stub:
        judge = pairwise_judge(stub)
        out = pairwise_win_rate(["q1", "q2"], ["good", "bad"], ["bad", "good"], judge)
        log = list(stub.log)
    assert out["n_valid"] == 2 and out["win_rate"] == 0.5 and out["position_consistency"] == 1.0
    assert not judge.failures
    tries = per_prompt(log)
    assert len(tries) == 4 and all(len(t) == 2 for t in tries.values()), tries  # until the first good answer
    assert all(r["auth"] == f"Bearer {KEY}" for r in log)  # the key from the environment was sent...
    assert KEY[:12] not in caplog.text  # ...and logged nowhere, not even by the HTTP stack's debug logs
    if first == RATE_429:
        assert all(t[1] - t[0] >= 0.95 for t in tries.values()), tries  # Retry-After: 1 waited out


@pytest.mark.parametrize("reply,reason,tries", [
    (ERROR_500, r"^HTTP 500 Internal Server Error: upstream exploded$", 3),  # max_retries=2: 3 attempts
    (BAD_REQUEST_400, r"^HTTP 400 Bad Request: context length exceeded$", 1),  # would fail again: not retried
], ids=["persistent_500", "400_not_retried"])
def test_failing_request_gives_no_verdict_with_the_reason(reply, reason, tries, key, tmp_path):
    with StubJudge(lambda body: reply) as stub:
        judge = pairwise_judge(stub, cache_path=tmp_path / "cache.sqlite")
        out = pairwise_win_rate(["q1"], ["good"], ["bad"], judge)
        log = list(stub.log)
    assert out["n_valid"] == 0 and out["win_rate"] is None  # never a default verdict
    assert len(judge.failures) == 2 and all(re.search(reason, f) for f in judge.failures), judge.failures
    assert all(len(t) == tries for t in per_prompt(log).values())
    assert judge.cache.count(ok=False) == 2 and judge.cache.count(ok=True) == 0  # a rerun asks again


@pytest.mark.parametrize("reply,says", [
    (AUTH_401, r"HTTP 401 Unauthorized: Incorrect API key provided: \*\*\*\. \(the API key was refused; "
               r"check \$OPENAI_API_KEY\)$"),
    (NOT_FOUND_404, rf"HTTP 404 Not Found: .*\(check that eval\.pairwise_judge \({MODEL}\) is served there and "
                    r"score\.base_url is right\)$"),
], ids=["401", "404"])
def test_fatal_answer_stops_with_one_line(reply, says, key, tmp_path, caplog):
    caplog.set_level("DEBUG")
    with StubJudge(lambda body: reply) as stub:
        judge = pairwise_judge(stub, cache_path=tmp_path / "cache.sqlite", concurrency=2)
        with pytest.raises(JudgeFatalError) as e:
            pairwise_win_rate([f"q{i}" for i in range(6)], ["good"] * 6, ["bad"] * 6, judge)
        log = list(stub.log)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"judge endpoint {stub.base_url} answered ") and re.search(says, msg), msg
    assert isinstance(e.value, ValueError)  # the CLI's one-line error, exit code 2
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no traceback chained to the raw error
    assert 1 <= len(log) <= 2 and all(len(t) == 1 for t in per_prompt(log).values())  # stopped at once, no retry
    assert all(r["auth"] == f"Bearer {KEY}" for r in log)  # the key was really sent...
    assert KEY[:12] not in msg + caplog.text  # ...and is shown nowhere, not even in part
    assert all(KEY[:12].encode() not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_export_alpaca_eval(tmp_path):
    path = tmp_path / "out" / "model_outputs.json"
    assert export_alpaca_eval(path, ["q1", "q2"], ["a1", "a2"], generator="ual-smollm2") == 2
    rows = json.loads(path.read_text())
    assert rows == [{"instruction": "q1", "output": "a1", "generator": "ual-smollm2"},
                    {"instruction": "q2", "output": "a2", "generator": "ual-smollm2"}]
    with pytest.raises(ValueError):
        export_alpaca_eval(path, ["q"], [], generator="g")
