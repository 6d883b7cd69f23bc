"""The package's one OpenAI-compatible judge client: a request under a total deadline, a body checked
field by field, errors in words, and "messages -> text" with retries.

One attempt:
- `post_chat` sends one chat completion under a total deadline (connect, headers
  and body together) and returns the checked answer;
- `parse_completion` turns a 200's body into (text, log-probabilities, usage) or
  raises MalformedResponse naming what is wrong ("empty choices");
- `classify` turns any failure into a one-line reason and a verdict: retry,
  give up on this sample, retry without log-probabilities, or stop the run;
  `judge_failure` adds the key scrubbing and, for a fatal verdict, raises
  JudgeFatalError with `fatal_message`'s one line.
- `redact` scrubs the API key (and anything shaped like one) from a message,
  `fatal_message` is the one line for an error no retry can fix.
Around it: `open_client` (the key from $OPENAI_API_KEY, the client's own retries
off), `RateLimiter` (requests and tokens per minute, paused by a Retry-After),
`estimate_tokens` (a request's size before sending).
"messages -> text" calls (DEITA's judge, the pairwise judge): `ChatEndpoint`
makes one attempt and says what happened (EndpointError: reason, verdict,
Retry-After); `ask_all` asks many requests concurrently, each retried by
`ask_with_retries` (the one retry loop of such calls) until an acceptable answer
or its attempts are spent; a fatal error stops them all.
Nothing here sees the API key except through the client. Text that comes from
the server (an error message, a body that is not JSON) may echo it: classify
passes it through the caller's scrubber (`redact` with the key) before cutting
it short, so a key cut in half cannot slip past the scrubber.
Used by judge.py (`ual score`, with its own loop: caching, log-probabilities,
n-sample draws), deita.py (`ual select --scorer judge`) and ual.evaluation.pairwise.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Awaitable, Callable, NamedTuple

# After the deadline the request is cancelled; give it this long to close its connection, then move on.
_GRACE_S = 2.0
NO_KEY_PLACEHOLDER = "sk-no-key-required"  # for base_url endpoints that take none


class MalformedResponse(ValueError):
    """A 200 whose body is not a usable chat completion; the message says what is wrong.

    `body`: the body as text when it is not JSON (server text: scrub before showing).
    """

    def __init__(self, what: str, body: str | None = None):
        super().__init__(f"malformed response: {what}")
        self.body = body


class DeadlineExceeded(TimeoutError):
    """No complete response (connect, headers and body) within the request's total deadline."""


class JudgeFatalError(RuntimeError, ValueError):
    """An error that retrying cannot fix (bad key, unknown model): the run stops.

    Also a ValueError, so the CLI reports it the way it reports a bad setting: one
    line ("ual score: error: ...") and exit code 2, no traceback. Its message is
    scrubbed of the key.
    """


class Completion(NamedTuple):
    text: str
    content: list[dict] | None  # per sampled token: token, logprob, top_logprobs [{token, logprob}]; None if not sent
    usage: tuple[int, int]  # (prompt, completion) tokens, 0 where not reported


def read_api_key() -> str:
    """The API key: from $OPENAI_API_KEY only ("" when unset)."""
    return os.environ.get("OPENAI_API_KEY") or ""


def open_client(key: str, base_url: str | None, deadline_s: float):
    """An AsyncOpenAI client for post_chat; JudgeFatalError when there is no key for the OpenAI API.

    A base_url endpoint that takes no key gets a placeholder. The client's own retries are
    off (every attempt is the caller's, counted and visible); post_chat's deadline is the one
    that counts: the client's time-outs, per connect and per read, are set past it so that
    they only back it up and every time-out reads the same.
    """
    from openai import AsyncOpenAI

    key = key or (NO_KEY_PLACEHOLDER if base_url else "")
    if not key:
        raise JudgeFatalError("OPENAI_API_KEY is not set (it is read from the environment only)")
    return AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=deadline_s + 5)


async def post_chat(client, kwargs: dict, deadline_s: float) -> Completion:
    """One chat completion through the openai client, under a total deadline of deadline_s.

    Why a deadline of our own: the client's (httpx's) timeouts are per operation
    (connect, write, pool, and each read) and a read's restarts with every chunk,
    so a server trickling its body one byte at a time is never cut off. Nothing in
    the client bounds the whole exchange. Here the request is an asyncio task that
    is cancelled when the deadline passes, wherever it is waiting (connecting,
    reading headers or body): cancellation needs no cooperation from the server,
    closes the connection (the pool discards it), and needs no extra thread since
    all of the client's I/O is on the event loop. with_raw_response keeps the body
    as sent, so parse_completion sees exactly what the server said.
    """
    task = asyncio.ensure_future(_post(client, kwargs))
    try:
        done, _ = await asyncio.wait({task}, timeout=deadline_s)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=_GRACE_S)  # a cancelled request closing: never wait long on it
            if not (task.done() and not task.cancelled() and task.exception() is None):
                task.add_done_callback(_quiet)
                raise DeadlineExceeded(f"timed out after {deadline_s:g} s (score.timeout_s): no complete response")
    except asyncio.CancelledError:  # this worker was stopped (a fatal error elsewhere): stop the request too
        task.cancel()
        raise
    return parse_completion(task.result())  # an answer that made it in the grace period is paid for: keep it


async def _post(client, kwargs: dict) -> bytes:
    raw = await client.chat.completions.with_raw_response.create(**kwargs)
    return raw.http_response.content  # read in full before create returns (not a streamed response)


def _quiet(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log "exception was never retrieved"


# ---------------------------------------------------------------------- the body

def parse_completion(body: bytes) -> Completion:
    """Text, log-probabilities and usage of a chat.completion body; MalformedResponse names what is missing."""
    try:
        resp = json.loads(body)
    except ValueError:
        raise MalformedResponse(f"body is not JSON ({len(body)} bytes)", body[:65536].decode("utf-8", "replace")) from None
    if not isinstance(resp, dict):
        raise MalformedResponse(f"body is a JSON {type(resp).__name__}, not an object")
    choices = resp.get("choices")
    if not isinstance(choices, list):
        raise MalformedResponse("no choices list" if choices is None else f"choices is a {_kind(choices)}, not a list")
    if not choices:
        raise MalformedResponse("empty choices")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise MalformedResponse(f"choices[0] is a {_kind(choice)}, not an object")
    message = choice.get("message")
    if not isinstance(message, dict):
        raise MalformedResponse("choices[0].message is missing" if message is None
                                else f"choices[0].message is a {_kind(message)}, not an object")
    text = message.get("content")
    if not isinstance(text, str):
        raise MalformedResponse(f"choices[0].message.content is {'null' if text is None else 'a ' + _kind(text)}, "
                                "not text")
    usage = resp.get("usage") if isinstance(resp.get("usage"), dict) else {}
    return Completion(text, _logprobs(choice.get("logprobs")),
                      (_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))))


def _logprobs(lp) -> list[dict] | None:
    """choices[0].logprobs.content, checked: None when the endpoint sent none (the sampled number is used)."""
    if lp is None:
        return None
    where = "choices[0].logprobs"
    if not isinstance(lp, dict):
        raise MalformedResponse(f"{where} is a {_kind(lp)}, not an object")
    content = lp.get("content")
    if content is None or content == []:
        return None
    if not isinstance(content, list):
        raise MalformedResponse(f"{where}.content is a {_kind(content)}, not a list")
    out = []
    for i, tok in enumerate(content):
        entry = _token(tok, f"{where}.content[{i}]")
        tops = tok.get("top_logprobs") or []
        if not isinstance(tops, list):
            raise MalformedResponse(f"{where}.content[{i}].top_logprobs is a {_kind(tops)}, not a list")
        entry["top_logprobs"] = [_token(t, f"{where}.content[{i}].top_logprobs[{j}]") for j, t in enumerate(tops)]
        out.append(entry)
    return out


def _token(t, where: str) -> dict:
    if not isinstance(t, dict):
        raise MalformedResponse(f"{where} is a {_kind(t)}, not an object")
    token, logprob = t.get("token"), t.get("logprob")
    if not isinstance(token, str):
        raise MalformedResponse(f"{where}.token is {'missing' if token is None else 'a ' + _kind(token)}")
    # a log-probability is a number <= 0 (-inf allowed: probability 0); a little above 0 is rounding
    if isinstance(logprob, bool) or not isinstance(logprob, (int, float)) or math.isnan(logprob) or logprob > 1e-3:
        raise MalformedResponse(f"{where}.logprob is not a log-probability: {json.dumps(logprob)[:40]}")
    return {"token": token, "logprob": float(logprob)}


def _kind(x) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(x), type(x).__name__)


def _count(x) -> int:
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 else 0


# ---------------------------------------------------------------------- failures

def classify(exc: BaseException, asked_logprobs: bool, scrub=lambda text: text) -> tuple[str, str]:
    """(one-line reason, verdict) for a failed attempt; scrub(text) removes the key from server text. Verdicts:
    "retry": transient (time-out, dropped connection, 408/409/429, 5xx, malformed body: a glitch may pass);
    "final": this request would fail the same way again (other 4xx): the sample is listed as failed now;
    "no_logprobs": the endpoint refuses log-probabilities: retry without them;
    "fatal": retrying cannot help any sample (401 wrong key, 403 no access, 404 unknown model): stop the run.
    """
    import openai

    if isinstance(exc, MalformedResponse) and exc.body is not None:
        return f"{exc}: {_one_line(scrub(exc.body), 80)!r}", "retry"
    if isinstance(exc, (DeadlineExceeded, MalformedResponse)):
        return str(exc), "retry"
    if isinstance(exc, openai.APITimeoutError):  # the client's own per-read time-out, before the deadline
        return "timed out (no data within score.timeout_s)", "retry"
    if isinstance(exc, openai.APIStatusError):
        status, reason = exc.status_code, http_reason(exc, scrub)
        if status in (401, 403, 404):
            return reason, "fatal"
        if status == 400 and asked_logprobs and "logprob" in reason.lower():
            return "endpoint refused logprobs; retrying without", "no_logprobs"
        if 400 <= status < 500 and status not in (408, 409, 429):
            return reason, "final"
        return reason, "retry"
    if isinstance(exc, openai.APIConnectionError):  # refused, reset, closed without an answer
        cause = exc.__cause__ or exc.__context__
        detail = f"{type(cause).__name__}: {cause}" if cause is not None and str(cause) else str(exc)
        return f"connection failed ({_one_line(scrub(detail))})", "retry"
    return f"{type(exc).__name__}: {_one_line(scrub(str(exc)))}", "retry"  # anything else: as before, retried


def http_reason(exc, scrub=lambda text: text) -> str:
    """'HTTP 500 Internal Server Error: upstream exploded': the status and the server's own message."""
    status = exc.status_code
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    body = getattr(exc, "body", None)  # the client's parse of the error body ({"message": ...} or text)
    if isinstance(body, dict):
        msg = body.get("message") or body.get("error") or json.dumps(body)
    elif isinstance(body, str) and body.strip():
        msg = body
    else:
        msg = re.sub(r"^Error code: \d+ - ", "", str(getattr(exc, "message", exc)))
    return f"HTTP {status}{' ' + phrase if phrase else ''}: {_one_line(scrub(str(msg)))}"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def retry_after(exc) -> float | None:
    """Seconds from Retry-After / retry-after-ms headers (number or HTTP date), if any."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
        value = headers.get("retry-after")
        if value and value.strip().replace(".", "", 1).isdigit():
            return float(value)
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time()) if value else None
    except (TypeError, ValueError):
        return None


def redact(text: str, key: str = "") -> str:
    """`text` without the API key `key`, anything shaped like an OpenAI key, or a bearer token."""
    if key and len(key) >= 6:
        text = text.replace(key, "***")
    text = re.sub(r"sk-[A-Za-z0-9_\-*]{6,}", "sk-***", text)
    return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)


def fatal_message(reason: str, base_url: str | None, model: str, model_setting: str = "score.model",
                  url_setting: str = "score.base_url") -> str:
    """One line for a "fatal" verdict (401, 403, 404): what the endpoint said and which setting to check.

    The endpoint is named with any credentials in its URL masked; scrub `reason` before passing it.
    """
    where = re.sub(r"//[^/@]*@", "//***@", base_url) if base_url else "the OpenAI API"
    if reason.startswith("HTTP 401"):
        hint = "the API key was refused; check $OPENAI_API_KEY"
    elif reason.startswith("HTTP 403"):
        hint = f"no access to model {model} with this key; check $OPENAI_API_KEY and {model_setting}"
    else:
        hint = f"check that {model_setting} ({model}) is served there and {url_setting} is right"
    return f"judge endpoint {where} answered {reason} ({hint})"


def judge_failure(exc: BaseException, key: str, base_url: str | None, model: str, asked_logprobs: bool = False,
                  model_setting: str = "score.model", url_setting: str = "score.base_url") -> tuple[str, str]:
    """classify(exc) with the key scrubbed: (reason, verdict); a "fatal" verdict raises JudgeFatalError.

    Call it inside the `except` that caught exc: the error it raises drops exc as its context,
    so no traceback shows the unscrubbed original.
    """
    def scrub(text: str) -> str:
        return redact(text, key)

    reason, verdict = classify(exc, asked_logprobs=asked_logprobs, scrub=scrub)
    reason = scrub(reason)[:300]  # belt and braces: nothing unscrubbed is kept
    if verdict == "fatal":
        raise JudgeFatalError(scrub(fatal_message(reason, base_url, model, model_setting, url_setting))) from None
    return reason, verdict


# ---------------------------------------------------------------------- pacing

def estimate_tokens(messages: list[dict], max_tokens: int, chars_per_token: float = 4.0) -> float:
    """A request's prompt + answer tokens, estimated before sending (dry run, token rate limit)."""
    return sum(len(m["content"]) / chars_per_token + 4 for m in messages) + max_tokens


class RateLimiter:
    """Token buckets for requests/min and tokens/min, plus a shared pause after a 429."""

    def __init__(self, rpm: float | None, tpm: float | None):
        self.buckets = [[r / 60.0, r / 6.0, r / 6.0, time.monotonic()] for r in (rpm, tpm) if r]
        self.kinds = [k for k, r in (("req", rpm), ("tok", tpm)) if r]
        self.paused_until = 0.0

    async def acquire(self, tokens: float) -> None:
        now, wait = time.monotonic(), 0.0
        for kind, b in zip(self.kinds, self.buckets):
            rate, cap, level, last = b
            need = min(1.0 if kind == "req" else tokens, cap)
            level = min(cap, level + (now - last) * rate) - need  # reserve now, may go negative
            b[2], b[3] = level, now
            wait = max(wait, -level / rate if level < 0 else 0.0)
        wait = max(wait, self.paused_until - now)
        if wait > 0:
            await asyncio.sleep(wait)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """The wait before retry `attempt + 1`: base_s * 2^attempt, at most max_s, jittered to 50-100 %."""
    return min(max_s, base_s * 2 ** attempt) * random.uniform(0.5, 1)


# ---------------------------------------------------------------------- messages -> text

class EndpointError(RuntimeError):
    """One failed request to the judge endpoint, as classify judged it.

    reason: one line, key scrubbed; verdict: "retry" or "final"; retry_after: the server's wait in seconds, if any.
    """

    def __init__(self, reason: str, verdict: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.verdict, self.retry_after = reason, verdict, retry_after


class ChatEndpoint:
    """messages -> text from an OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, Ollama...), at `temperature`.

    Every request goes through post_chat: a total deadline of timeout_s for connect,
    headers and body together; a 200 whose body is not a usable chat completion fails
    with the reason ("malformed response: empty choices"); a failure becomes an
    EndpointError with a one-line reason and a verdict, or, for 401/403/404, a
    JudgeFatalError naming the endpoint and the settings to check (model_setting,
    url_setting: how the caller's user spells them, "--judge-model" or
    "eval.pairwise_judge"). Optional request and token rate limits (per minute) are
    shared by every request, and a Retry-After pauses them all. One call is one attempt:
    the retries are ask_with_retries'. The key comes from $OPENAI_API_KEY only (a local
    base_url needs none) and is scrubbed from every message.
    """

    def __init__(self, model: str, base_url: str | None = None, max_tokens: int = 8, timeout_s: float = 120.0,
                 requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 temperature: float = 0.0, model_setting: str = "score.model", url_setting: str = "score.base_url"):
        if timeout_s <= 0:
            raise ValueError("the judge timeout must be positive")
        self.model, self.base_url, self.max_tokens, self.timeout_s = model, base_url, max_tokens, timeout_s
        self.temperature, self.settings = temperature, (model_setting, url_setting)
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)
        self._key = read_api_key()

    def check_key(self) -> None:
        """JudgeFatalError now, before any request, when there is no key for the OpenAI API."""
        if not (self._key or self.base_url):
            raise JudgeFatalError("OPENAI_API_KEY is not set (it is read from the environment only)")

    @asynccontextmanager
    async def session(self):
        """An async `ask(messages) -> text` on one client (one connection pool), closed on exit."""
        client = open_client(self._key, self.base_url, self.timeout_s)
        try:
            yield lambda messages: self._ask(client, messages)
        finally:
            await client.close()

    async def _ask(self, client, messages: list[dict]) -> str:
        await self.limiter.acquire(estimate_tokens(messages, self.max_tokens))
        kwargs = dict(model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens)
        try:
            return (await post_chat(client, kwargs, self.timeout_s)).text
        except Exception as exc:  # time-outs, HTTP errors, dropped connections, malformed bodies
            reason, verdict = judge_failure(exc, self._key, self.base_url, self.model, False, *self.settings)
            wait = retry_after(exc)
            if wait is not None:
                wait = min(wait, 600.0)
                self.limiter.pause(wait)  # everyone waits, not just this request
            raise EndpointError(reason, verdict, wait) from None

    def __call__(self, messages: list[dict]) -> str:
        """One request (no retry): the answer's text, or EndpointError / JudgeFatalError."""
        async def once():
            async with self.session() as ask:
                return await ask(messages)

        return run_async(once())


@dataclass
class Answer:
    """What asking one request came to: value is accept(text) of the first acceptable answer, else None."""

    value: object = None
    text: str | None = None
    reasons: list[str] = field(default_factory=list)  # why each failed attempt failed, in order
    attempts: int = 0

    @property
    def error(self) -> str:
        return self.reasons[-1] if self.reasons else "no attempt made"


def _any_text(text):
    return text


async def ask_with_retries(ask: Callable[[list[dict]], Awaitable[str]], messages: list[dict], attempts: int,
                           accept: Callable = _any_text, backoff_base_s: float = 1.0,
                           backoff_max_s: float = 60.0) -> Answer:
    """Ask until accept(text) is not None, `attempts` times at most; a failed request and an unacceptable answer
    each use one attempt.

    A failed request is retried after backoff_s, or after the server's Retry-After; one
    whose verdict is "final" (a 4xx such as 400) is not retried; a JudgeFatalError
    (401/403/404) propagates. `ask` may also be any other async callable: its failures
    are retried. An unacceptable answer is asked again at once.
    """
    reasons: list[str] = []
    for attempt in range(attempts):
        try:
            text = await ask(messages)
        except JudgeFatalError:
            raise
        except EndpointError as exc:  # the judge client's verdict: retry (after a wait) or not
            reasons.append(exc.reason)
            if exc.verdict == "final":
                break
            wait = exc.retry_after
        except Exception as exc:  # any other callable's failure (network, rate limit...): retried, then counted
            reasons.append(f"{type(exc).__name__}: {_one_line(str(exc))}")
            wait = None
        else:
            value = accept(text)
            if value is not None:
                return Answer(value, text, reasons, attempt + 1)
            reasons.append(f"unusable answer: {_one_line(str(text), 80)!r}")
            continue
        if attempt + 1 < attempts:
            await asyncio.sleep(wait if wait is not None else backoff_s(attempt, backoff_base_s, backoff_max_s))
    return Answer(None, None, reasons, len(reasons))


async def ask_all(complete, requests: list[list[dict]], attempts: int, accept: Callable = _any_text,
                  concurrency: int = 4, backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                  on_answer: Callable[[int, Answer], None] | None = None) -> list[Answer]:
    """One Answer per request (ask_with_retries), at most `concurrency` in flight.

    `complete`: a ChatEndpoint (its session: one client for all), or any callable
    messages -> text (run in threads). on_answer(i, answer) is called as each one
    arrives (to commit it at once). A JudgeFatalError stops every request and propagates;
    requests still waiting send nothing.
    """
    stopped = []

    async with _session(complete, concurrency) as ask:
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(i, messages):
            async with gate:
                if stopped:
                    return None
                try:
                    answer = await ask_with_retries(ask, messages, attempts, accept, backoff_base_s, backoff_max_s)
                except JudgeFatalError:
                    stopped.append(True)
                    raise
                if on_answer is not None:
                    on_answer(i, answer)
                return answer

        tasks = [asyncio.ensure_future(one(i, m)) for i, m in enumerate(requests)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:  # a fatal error (bad key) stops every request, not just one
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


def complete_all(complete, requests: list[list[dict]], attempts: int, accept: Callable = _any_text,
                 concurrency: int = 4, backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 on_answer: Callable[[int, Answer], None] | None = None) -> list[Answer]:
    """ask_all from synchronous code (also from inside a running event loop)."""
    if not requests:
        return []
    return run_async(ask_all(complete, requests, attempts, accept, concurrency, backoff_base_s, backoff_max_s,
                             on_answer))


@asynccontextmanager
async def _session(complete, concurrency: int):
    """An async ask(messages) for `complete`: the endpoint's own session, or a plain callable run in threads."""
    if isinstance(complete, ChatEndpoint):
        async with complete.session() as ask:
            yield ask
        return
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        yield lambda messages: loop.run_in_executor(pool, complete, messages)


def run_async(coro):
    """Run a coroutine to completion, also when called from inside an event loop (notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
