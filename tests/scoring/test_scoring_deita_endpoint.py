"""`ual select --scorer judge` against a real loopback HTTP server (judge_server.StubJudge).

DEITA's chat judge sends its requests through the package's judge client
(ual.scoring.judge_http, the one `ual score` uses); these tests show that client's
behaviour reaching DEITA over real HTTP, not through mocks:
- a transient failure (500, 429 with Retry-After, a dropped connection) is retried and
  then scored, asked exactly until the first good answer; Retry-After is waited out;
- a request that keeps failing (5xx, a malformed 200, a stalled server past the total
  deadline) leaves the sample unscored with the client's one-line reason, after the
  configured attempts; a 400 is not retried;
- a wrong key, no access or an unknown model (401/403/404) stops `ual select` with one
  line naming the endpoint, without retrying and without the key anywhere.
The key (not shaped like "sk-...", so only exact redaction catches it) is echoed back
by the server in the error bodies.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time

import pytest

from judge_server import DROP, STALL, StubJudge, completion, error_replies, per_attempt, reasoning_model
from ual.cli import main
from ual.sample import Sample
from ual.scoring.deita import ChatJudgeScorer, EndpointError, openai_complete, score_samples
from ual.scoring.judge import JudgeFatalError

KEY = "ual-deita-key-5c1e9b7a03f2d4"
MODEL = "gpt-4o-mini"
_ERRORS = error_replies(KEY, MODEL)
ERROR_500, RATE_429, BAD_REQUEST_400, AUTH_401, FORBIDDEN_403, NOT_FOUND_404 = (
    _ERRORS[s] for s in ("500", "429", "400", "401", "403", "404"))
EMPTY_CHOICES = {**completion("4"), "choices": []}


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def judge_answer(body) -> dict:
    text = body["messages"][-1]["content"]
    return completion("4" if "##Complexity" in text else "Quality: 5")


OK = judge_answer  # the judge's real answer (per_attempt calls it with the request): complexity 4, quality 5


def samples(n=3):
    return [Sample.create("t", [{"role": "user", "content": f"Explain topic {i} briefly."},
                                {"role": "assistant", "content": f"Topic {i} is about {i} things."}])
            for i in range(n)]


def attempts(log) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in log:
        out.setdefault(r["key"], []).append(r["t"])
    return out


def scorer(stub, retries=3, timeout_s=10.0):
    return ChatJudgeScorer(openai_complete(MODEL, stub.base_url, timeout_s=timeout_s), name=f"judge:{MODEL}",
                           retries=retries, concurrency=2, backoff_base_s=0.05)


@pytest.mark.parametrize("first", [ERROR_500, RATE_429, DROP], ids=["500", "429_retry_after", "dropped"])
def test_transient_failure_is_retried_then_scored(first):
    pool = samples()
    with StubJudge(per_attempt(first, OK)) as stub:
        judge = scorer(stub)
        scores = score_samples(pool, judge)
        log = list(stub.log)
    assert not judge.failures
    assert all(scores[s.id] == {**scores[s.id], "complexity": [4.0], "quality": [5.0], "score": 20.0} for s in pool)
    per_prompt = attempts(log)
    assert len(per_prompt) == 2 * len(pool)  # a complexity and a quality prompt per sample
    assert all(len(t) == 2 for t in per_prompt.values()), per_prompt  # asked until the first good answer, not after
    assert all(r["auth"] == f"Bearer {KEY}" for r in log)  # the key from the environment was sent
    assert all(r["body"]["temperature"] == 0 and r["body"]["model"] == MODEL for r in log)
    if first == RATE_429:
        assert all(t[1] - t[0] >= 0.95 for t in per_prompt.values()), per_prompt  # Retry-After: 1 waited out


@pytest.mark.parametrize("reply,reason,tries", [
    (ERROR_500, r"^HTTP 500 Internal Server Error: upstream exploded$", 2),
    (EMPTY_CHOICES, r"^malformed response: empty choices$", 2),
    (STALL, r"^timed out after 0\.5 s", 2),  # the client's total deadline
    (BAD_REQUEST_400, r"^HTTP 400 Bad Request: context length exceeded$", 1),  # "final": not retried
], ids=["persistent_500", "malformed_200", "stalled", "400_not_retried"])
def test_failing_request_leaves_the_sample_unscored_with_the_reason(reply, reason, tries):
    pool = samples(2)
    with StubJudge(lambda body: reply) as stub:
        judge = scorer(stub, retries=2, timeout_s=0.5)
        scores = score_samples(pool, judge)
        log = list(stub.log)
    assert all(scores[s.id]["score"] is None for s in pool)  # never a default
    assert len(judge.failures) == 2 * len(pool) and all(re.search(reason, f) for f in judge.failures), judge.failures
    assert all(len(t) == tries for t in attempts(log).values())


def test_one_request_raises_the_clients_verdict():
    """openai_complete(...) is still a callable messages -> text; a failure says what the client decided."""
    messages = [{"role": "user", "content": "Rate this: 1-6"}]
    with StubJudge(per_attempt(ERROR_500, OK)) as stub:
        complete = openai_complete(MODEL, stub.base_url, timeout_s=10)
        with pytest.raises(EndpointError) as e:
            complete(messages)
        assert e.value.verdict == "retry" and e.value.reason.startswith("HTTP 500")
        assert complete(messages) == "Quality: 5"
    with StubJudge(lambda body: AUTH_401) as stub:
        with pytest.raises(JudgeFatalError) as e:
            openai_complete(MODEL, stub.base_url)(messages)
        assert stub.base_url in str(e.value) and KEY[:12] not in str(e.value)


def test_a_reasoning_model_judges_with_the_fields_it_accepts():
    """DEITA's judge on an OpenAI reasoning model: max_tokens, temperature 0 and log-probabilities refused (400
    each) are dropped once for the endpoint, without using an attempt; with too small a --max-tokens the model
    answers nothing and the reason says so."""
    with StubJudge(reasoning_model("5", thinks=100)) as stub:
        complete = openai_complete(MODEL, stub.base_url, max_tokens=500, timeout_s=10)
        assert complete([{"role": "user", "content": "Rate this: 1-6"}]) == "5"
        refused = len(stub.log) - 1
        scorer = ChatJudgeScorer(complete, retries=1, concurrency=2)
        assert scorer.complexity(["a", "b", "c"]) == [5.0, 5.0, 5.0] and not scorer.failures
        assert len(stub.log) == refused + 1 + 3  # learned once: no more refusals
        assert all(b["body"].get("max_completion_tokens") == 500 and "temperature" not in b["body"]
                   for b in stub.log[refused:])
        short = ChatJudgeScorer(openai_complete(MODEL, stub.base_url, max_tokens=20, timeout_s=10), retries=3)
        assert short.complexity(["a"]) == [None]
    assert refused == 2  # max_tokens, temperature (DEITA's judge asks for no log-probabilities)
    assert "hit the token limit before any text" in short.failures[0]


def test_the_stub_server_is_quiet_when_a_client_resets(capsys):
    """A fatal answer cancels the other request in flight, which resets its connection; the server must
    not print that reset's traceback into the stderr the next test reads (a CI run failed on exactly that)."""
    with StubJudge(lambda body: AUTH_401) as stub:
        conn = socket.create_connection(("127.0.0.1", stub.port))
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
        time.sleep(0.2)  # the server's handler is now reading the request line
        conn.close()
        time.sleep(0.3)
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("reply,says", [
    (AUTH_401, r"HTTP 401 Unauthorized: Incorrect API key provided: \*\*\*\. \(the API key was refused; check \$OPENAI_API_KEY\)"),
    (FORBIDDEN_403, rf"HTTP 403 Forbidden: .*\(no access to model {MODEL} with this key"),
    (NOT_FOUND_404, rf"HTTP 404 Not Found: .*\(check that --judge-model \({MODEL}\) is served there and --base-url"),
], ids=["401", "403", "404"])
def test_select_stops_with_one_line_on_a_fatal_answer(reply, says, tmp_path, tiny_model_dir, capsys, caplog):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"messages": s.messages}) + "\n" for s in samples(6)))
    out = tmp_path / "sel.jsonl"
    caplog.set_level("DEBUG")  # the openai client's and the HTTP stack's debug logs must not show the key either
    with StubJudge(lambda body: reply) as stub:
        rc = main(["select", "--source", str(pool), "--n", "2", "--out", str(out), "--scorer", "judge",
                   "--judge-model", MODEL, "--base-url", stub.base_url, "--concurrency", "2",
                   "--embed-model", str(tiny_model_dir), "--device", "cpu", "-v"])
        log = list(stub.log)
    o = capsys.readouterr()
    assert rc == 2 and not o.out
    errors = [x for x in o.err.splitlines() if x.startswith("ual select: error:")]
    assert len(errors) == 1 and "Traceback" not in o.err, o.err
    assert f"judge endpoint {stub.base_url} answered " in errors[0] and re.search(says, errors[0]), errors[0]
    assert 1 <= len(log) <= 2 and all(len(t) == 1 for t in attempts(log).values())  # stopped at once, no retry
    assert all(r["auth"] == f"Bearer {KEY}" for r in log)  # the key was really sent...
    assert KEY[:12] not in o.err + o.out + caplog.text  # ...and is shown nowhere, not even in part
    assert all(KEY[:12].encode() not in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert not out.exists()


def test_select_command_scores_through_the_endpoint(tmp_path, tiny_model_dir):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"messages": s.messages}) + "\n" for s in samples(4)))
    out = tmp_path / "sel.jsonl"
    with StubJudge(per_attempt(ERROR_500, OK)) as stub:
        rc = main(["select", "--source", str(pool), "--n", "3", "--out", str(out), "--scorer", "judge",
                   "--judge-model", MODEL, "--base-url", stub.base_url, "--attempts", "2", "--timeout-s", "30",
                   "--embed-model", str(tiny_model_dir), "--device", "cpu", "--threshold", "1.0"])
        log = list(stub.log)
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["meta"]["deita"] == {"complexity": [4.0], "quality": [5.0], "score": 20.0}
                                  for r in rows)
    assert all(len(t) == 2 for t in attempts(log).values()) and len(attempts(log)) == 8
    stats = json.loads((tmp_path / "sel.jsonl.stats.json").read_text())
    assert stats["failed_scoring"] == 0 and stats["scorer"] == f"judge:{MODEL}"
