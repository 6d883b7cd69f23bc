"""`ual score` against a misbehaving judge endpoint (issue 14, class "Judge").

Every case runs the real CLI in a subprocess (so a traceback, a hang or the exit
code is seen as a user sees it) against a real loopback HTTP server
(judge_server.StubJudge) that trickles its body, stalls, answers 401/403/429/5xx
or sends a 200 that is not a usable chat completion. For each case:
- the exit code, and each failed sample's reason, are what a user needs to act on;
- the API key (deliberately not shaped like "sk-...", so only exact redaction can
  catch it, and echoed back by the server) appears in no output, log or file;
- the inputs (source file, config, samples.jsonl, heldout.jsonl, data_stats.json)
  are unchanged;
- a failed run leaves no scores file; a finished one lists every sample, each
  either scored or failed with its reason, and its summary counts them so.
A SIGKILL mid-scoring pays again only for the requests in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from judge_server import DROP, HEADERS_ONLY, STALL, StubJudge, Trickle, completion, error_replies, per_attempt
from ual.scoring.cache import JudgeCache
from ual.scoring.unscored import EXIT_UNSCORED

KEY = "ual-test-key-8f3a2c91d7e4b5"  # what OPENAI_API_KEY holds in every run here
N, RETRIES, TIMEOUT_S = 6, 1, 1.0
FATAL_CONCURRENCY = 2  # a fatal error must stop the run: at most this many requests ever sent
INPUTS = ("samples.jsonl", "heldout.jsonl", "data_stats.json")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "UAL_JUDGE_CACHE"}
    env["OPENAI_API_KEY"] = KEY
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A run folder built once by `ual data` (6 chat samples); each test scores a copy of it."""
    root = tmp_path_factory.mktemp("judge-template")
    src = root / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Write a two-line poem about the number {i}."},
                          {"role": "assistant", "content": f"Number {i} stands alone, / quiet as a stone."}]}
            for i in range(N)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = f"{{max_length: 96, sources: [{{name: {src}, label: chat, train: {N}}}]}}"
    (root / "data.yaml").write_text(f"run_dir: {root / 'run'}\nmodel: smollm2-135m\ndata: {data}\n")
    done = subprocess.run([sys.executable, "-m", "ual.cli", "data", str(root / "data.yaml")], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return {"run": root / "run", "source": src, "data": data}


@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    run: Path
    summary: dict | None  # the JSON `ual score` prints when it finishes
    rows: list[dict] | None  # scores.jsonl, if written


def score(template, tmp_path, base_url: str, timeout: float = 90, start_only: bool = False, **score_cfg):
    """`ual score CONFIG` on a fresh copy of the template run, judged by `base_url`."""
    run = tmp_path / "run"
    shutil.copytree(template["run"], run)
    cfg = {"scorer": "judge", "model": "gpt-4o-mini", "base_url": base_url, "timeout_s": TIMEOUT_S,
           "max_retries": RETRIES, "concurrency": N, "heldout": False, **score_cfg}
    config = tmp_path / "exp.yaml"
    config.write_text(f"run_dir: {run}\nmodel: smollm2-135m\ndata: {template['data']}\nscore: {json.dumps(cfg)}\n")
    # -v: debug logging (the openai client's and the HTTP stack's too) must not leak the key either
    cmd = [sys.executable, "-m", "ual.cli", "score", str(config), "-v"]
    if start_only:
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), run
    before = {p: _digest(p) for p in _inputs(template, tmp_path)}
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    after = {p: _digest(p) for p in _inputs(template, tmp_path)}
    assert before == after, "an input was changed"
    try:
        summary = json.loads(done.stdout) if done.stdout.strip() else None
    except ValueError:
        summary = None
    rows = [json.loads(x) for x in (run / "scores.jsonl").read_text().splitlines()] \
        if (run / "scores.jsonl").exists() else None
    return Outcome(done.returncode, done.stdout, done.stderr, run, summary, rows)


def _inputs(template, tmp_path) -> list[Path]:
    return [template["source"], tmp_path / "exp.yaml"] + [tmp_path / "run" / f for f in INPUTS]


def assert_key_nowhere(o: Outcome, root: Path) -> None:
    part = KEY[:12]  # not even a piece of it (a message cut short mid-key)
    assert part not in o.out and part not in o.err
    for p in root.rglob("*"):  # the run folder, the judge cache (and its WAL), the config
        if p.is_file():
            assert part.encode() not in p.read_bytes(), f"API key written to {p}"


# ---------------------------------------------------------------------- the server's script

OK = completion("42", [{"token": "4", "logprob": 0.0, "top_logprobs": [{"token": "4", "logprob": 0.0}]},
                       {"token": "2", "logprob": 0.0, "top_logprobs": [{"token": "2", "logprob": 0.0}]}])
_OK_BYTES = json.dumps(OK).encode()
EMPTY_CHOICES = {**OK, "choices": []}
NO_MESSAGE = {**OK, "choices": [{"index": 0, "finish_reason": "stop"}]}
NULL_CONTENT = completion("x") | {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]}
BAD_LOGPROBS = completion("42", [{"token": "42", "logprob": -0.1,
                                   "top_logprobs": [{"token": "42", "logprob": "very likely"}]}])
NO_LOGPROBS = completion("42")  # an endpoint that does not return them: the sampled number is the score


def _no_content(**fields):
    """A 200 whose choice carries no answer text; `fields` go into the choice (finish_reason) or its message."""
    choice = {"index": 0, "finish_reason": fields.pop("finish_reason", "stop"),
              "message": {"role": "assistant", "content": None, **fields}}
    return completion("x") | {"choices": [choice]}


REFUSAL = _no_content(refusal="I can't help with that request.")
FILTERED = _no_content(finish_reason="content_filter")
CUT_WHILE_THINKING = _no_content(finish_reason="length", content="")  # a reasoning model's budget spent thinking
CONTENT_PARTS = completion("x") | {"choices": [{"index": 0, "finish_reason": "stop", "message": {
    "role": "assistant", "content": [{"type": "text", "text": "4"}, {"type": "text", "text": "2"}]}}]}
ERROR_WITH_200 = {"error": {"message": "upstream provider returned an error", "code": 502}}
# a proxy's error page echoing the key where a reason cut at 80 characters would split it
HTML_WITH_KEY = f"<html><body>upstream said: {'.' * 34} {KEY} was not accepted</body></html>".encode()
_ERRORS = error_replies(KEY)
AUTH_401, NOT_FOUND_404, FORBIDDEN_403, RATE_429, ERROR_500 = (_ERRORS[s] for s in ("401", "404", "403", "429", "500"))
ERROR_503 = (503, {"error": {"message": "overloaded, try later", "type": "server_error"}})
# valid JSON in the end (leading whitespace is legal), but at one byte per 50 ms: ~25 s for the body
SLOW_BODY = Trickle(b" " * 200 + _OK_BYTES, every_s=0.05)

TIMED_OUT = r"timed out after 1(\.0)? s"
# (id, replies: the k-th request about a sample gets the k-th, the last repeats, expected):
# "scored" | "scored_sampled" (no log-probabilities: the sampled number)
# | ("failed", reason regex for every sample, after every attempt) | ("final", the same after one attempt: asking
# again would end the same way) | ("fatal", regex for the one error line)
CASES = [
    ("trickled_body", (SLOW_BODY,), ("failed", TIMED_OUT)),
    ("trickled_body_then_ok", (SLOW_BODY, OK), "scored"),
    ("stalled_connection", (STALL,), ("failed", TIMED_OUT)),
    ("headers_then_silence", (HEADERS_ONLY,), ("failed", TIMED_OUT)),
    ("empty_choices", (EMPTY_CHOICES,), ("failed", r"^malformed response: empty choices")),
    ("non_json_body", (HTML_WITH_KEY,), ("failed", r"^malformed response: body is not JSON")),
    ("choice_without_message", (NO_MESSAGE,), ("failed", r"^malformed response: choices\[0\]\.message")),
    ("null_content", (NULL_CONTENT,), ("failed", r"^malformed response: .*content")),
    ("malformed_logprobs", (BAD_LOGPROBS,), ("failed", r"^malformed response: .*logprob")),
    ("missing_logprobs", (NO_LOGPROBS,), "scored_sampled"),
    ("401_wrong_key", (AUTH_401,), ("fatal", r"HTTP 401 Unauthorized: .*refused; check \$OPENAI_API_KEY")),
    ("403_forbidden", (FORBIDDEN_403,), ("fatal", r"HTTP 403 Forbidden: .*no access to model gpt-4o-mini")),
    ("404_unknown_model", (NOT_FOUND_404,), ("fatal", r"HTTP 404 Not Found: .*score\.model \(gpt-4o-mini\)")),
    ("429_then_ok", (RATE_429, OK), "scored"),
    ("500_then_ok", (ERROR_500, OK), "scored"),
    ("dropped_then_ok", (DROP, OK), "scored"),
    ("persistent_500", (ERROR_500,), ("failed", r"^HTTP 500 Internal Server Error: upstream exploded")),
    ("persistent_503", (ERROR_503,), ("failed", r"^HTTP 503 Service Unavailable: overloaded, try later")),
    ("5xx_then_malformed", (ERROR_503, EMPTY_CHOICES), ("failed", r"^malformed response: empty choices")),
    ("error_with_status_200", (ERROR_WITH_200,),
     ("failed", r"^malformed response: an error with status 200: upstream provider returned an error")),
    ("model_refusal", (REFUSAL,), ("failed", r"^malformed response: the model refused: .I can.{1,2}t help with that")),
    ("content_filter", (FILTERED,), ("failed", r"^malformed response: the endpoint's content filter withheld")),
    ("cut_while_thinking", (CUT_WHILE_THINKING,), ("final", r"^malformed response: the answer hit the token limit")),
    ("content_as_text_parts", (CONTENT_PARTS,), "scored_sampled"),
]


@pytest.mark.parametrize("replies,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_misbehaving_endpoint(template, tmp_path, replies, expected):
    kind = expected if isinstance(expected, str) else expected[0]
    answer = per_attempt(*replies)
    with StubJudge(answer) as stub:
        o = score(template, tmp_path, stub.base_url, **({"concurrency": FATAL_CONCURRENCY} if kind == "fatal" else {}))
        log = list(stub.log)
    assert "Traceback" not in o.err, o.err[-3000:]
    assert_key_nowhere(o, tmp_path)
    assert all(r["auth"] == f"Bearer {KEY}" for r in log)  # the key was really sent
    per_sample = {}
    for r in log:
        per_sample.setdefault(r["key"], []).append(r["t"])

    if kind == "fatal":  # a wrong key, no access, no such model: one clear line, a non-zero exit, no retry, no scores
        assert o.rc != 0 and o.summary is None, o.out
        errors = [x for x in o.err.splitlines() if x.startswith("ual score: error:")]
        assert len(errors) == 1 and re.search(expected[1], errors[0]), o.err[-2000:]
        assert len(log) <= FATAL_CONCURRENCY and all(len(t) == 1 for t in per_sample.values())  # nothing retried
        assert not (o.run / "scores.jsonl").exists() and not (o.run / "scores").exists()
        return

    # samples left without a score: every row still written, and exit 3 so a script cannot miss them
    assert o.rc == (0 if kind.startswith("scored") else EXIT_UNSCORED), o.err[-3000:]
    assert o.rows is not None and sorted(r["id"] for r in o.rows) == sorted(
        json.loads(x)["id"] for x in (o.run / "samples.jsonl").read_text().splitlines())
    assert len(per_sample) == N
    scored = [r for r in o.rows if r["score"] is not None]
    failed = [r for r in o.rows if r["score"] is None]
    assert o.summary["scored"] == len(scored) and o.summary["failed"] == len(failed)
    if kind.startswith("scored"):
        assert not failed, [r["details"] for r in failed]
        assert all(r["details"]["score_0_99"] == pytest.approx(42) for r in scored)
        # from the log-probabilities when given; else the sampled number, and the record says so
        assert all((r["details"]["expected"] is None) == (kind == "scored_sampled") for r in scored)
        # asked until the first good answer, never after it (an answer is never bought twice)
        assert all(len(t) == len(replies) for t in per_sample.values()), per_sample
        assert o.summary["failure_reasons"] == {}
        return

    # every sample failed: listed with one clear reason, after exactly the configured attempts (one if final)
    tries = 1 if kind == "final" else RETRIES + 1
    assert not scored and o.summary["failed"] == N
    for r in failed:
        assert re.search(expected[1], r["details"]["error"]), r["details"]
        assert len(r["details"]["reasons"]) == tries
    assert all(len(t) == tries for t in per_sample.values()), per_sample
    assert re.search(expected[1].lstrip("^"), o.err)  # the run's own warning names the reason too
    [last] = [x for x in o.err.splitlines() if x.startswith("ual score: ")]
    assert last.startswith(f"ual score: {N} sample(s) left without a score ({N} training, 0 held-out): ")
    assert "Next: run the same command again" in last and "--smoothing.missing drop" in last


def test_retry_after_is_honoured(template, tmp_path):
    with StubJudge(per_attempt(RATE_429, OK)) as stub:
        o = score(template, tmp_path, stub.base_url)
        log = list(stub.log)
    assert o.rc == 0 and o.summary["failed"] == 0
    first = {}
    for r in log:
        first.setdefault(r["key"], []).append(r["t"])
    assert all(len(t) == 2 and t[1] - t[0] >= 0.95 for t in first.values()), first


def test_trickled_body_is_cut_at_the_deadline(template, tmp_path):
    """The whole request, not each read, is bounded: 6 samples x 2 attempts end in seconds, not minutes."""
    with StubJudge(per_attempt(SLOW_BODY)) as stub:
        t0 = time.monotonic()
        o = score(template, tmp_path, stub.base_url, timeout=60)
        wall = time.monotonic() - t0
    assert o.rc == EXIT_UNSCORED and o.summary["failed"] == N
    # one round of 6 workers x (2 attempts of 1 s + a backoff of at most 1 s), plus start-up (~3 s, more when busy)
    assert wall < 25, wall


def test_sigkill_midrun_pays_again_only_for_requests_in_flight(template, tmp_path):
    def answer(body):
        time.sleep(0.4)
        return OK

    with StubJudge(answer) as stub:
        proc, run = score(template, tmp_path, stub.base_url, start_only=True, concurrency=2)
        cache = run / "judge_cache.sqlite"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if cache.exists():
                with JudgeCache(cache) as c:
                    if c.count(ok=True) >= 1:
                        break
            time.sleep(0.02)
        assert proc.poll() is None, f"finished before the kill: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        first = [r["key"] for r in stub.log]
        with JudgeCache(cache) as c:
            answered = c.count(ok=True)
        assert not (run / "scores.jsonl").exists()  # nothing presented as complete
        assert 1 <= answered < N and len(first) - answered <= 2  # lost: at most the 2 in flight
        mark = len(stub.log)
        o = subprocess.run([sys.executable, "-m", "ual.cli", "score", str(tmp_path / "exp.yaml")], env=_env(),
                           capture_output=True, text=True, timeout=120)
        second = [r["key"] for r in stub.log[mark:]]
    assert o.returncode == 0 and json.loads(o.stdout)["failed"] == 0, o.stderr[-2000:]
    assert len(second) == N - answered and len(set(first) | set(second)) == N
    assert KEY not in out + err + o.stdout + o.stderr
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes()
