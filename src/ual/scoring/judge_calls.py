"""Pacing and retries around the judge client (judge_http.py), for "messages -> text" calls.

- `estimate_tokens` (a request's size before sending), `RateLimiter` (requests and tokens per
  minute, paused by a Retry-After), `backoff_s` (jittered exponential backoff): shared with
  judge.py's own loop (`ual score`).
- `endpoint_error` turns a failed request into an EndpointError (reason, verdict,
  Retry-After) or raises JudgeFatalError; `ChatEndpoint` makes one attempt through it.
- `ask_with_retries` is the one retry loop over the judge client: used per request by
  judge.py (`ual score`, whose attempts also ask for log-probabilities and raise the
  temperature after an unparseable answer) and, through `ask_all` / `complete_all` (many
  requests concurrently; a fatal error stops them all), by deita.py (`ual select --scorer
  judge`) and ual.evaluation.pairwise.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ual.scoring.judge_http import (INSTEAD, JudgeFatalError, RequestFields, judge_failure, one_line, open_client,
                                    post_chat, read_api_key, retry_after)

log = logging.getLogger(__name__)


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

    reason: one line, key scrubbed; verdict: "retry", "final", or "adapted" (the endpoint refused a field
    the request now goes without: ask again at once, not counted as an attempt); retry_after: the
    server's wait in seconds, if any.
    """

    def __init__(self, reason: str, verdict: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.verdict, self.retry_after = reason, verdict, retry_after


class UnusableAnswer(Exception):
    """Raised by an `accept` of ask_with_retries for an answer it cannot use; the message is the reason kept."""


def endpoint_error(exc: BaseException, key: str, base_url: str | None, model: str, limiter: RateLimiter,
                   fields: RequestFields, sent: dict,
                   settings: tuple[str, str] = ("score.model", "score.base_url")) -> EndpointError:
    """A failed request (`sent`: its fields) as an EndpointError: judge_failure's one-line reason (key
    scrubbed) and verdict, and the server's Retry-After (capped at 10 min), which pauses every request on
    `limiter`, not just this one. A field the endpoint refuses is dropped from `fields`, for every later
    request of the run, and the verdict is "adapted".

    401/403/404 raise JudgeFatalError instead. Call it inside the `except` that caught exc, and raise what it
    returns `from None`: no traceback then shows the unscrubbed original.
    """
    reason, verdict = judge_failure(exc, key, base_url, model, sent, *settings)
    if verdict.startswith("refused:"):
        if fields.drop(verdict.split(":", 1)[1]):
            log.warning("judge %s: %s", model, reason)  # once per field and run: it changes every later request
        return EndpointError(reason, "adapted", 0.0)
    wait = retry_after(exc)
    if wait is not None:
        wait = min(wait, 600.0)
        limiter.pause(wait)
    return EndpointError(reason, verdict, wait)


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
        self.fields = RequestFields(logprobs=False)
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
        kwargs = self.fields.build(self.model, messages, self.max_tokens, self.temperature)
        try:
            return (await post_chat(client, kwargs, self.timeout_s)).text
        except Exception as exc:  # time-outs, HTTP errors, dropped connections, malformed bodies
            raise endpoint_error(exc, self._key, self.base_url, self.model, self.limiter, self.fields, kwargs,
                                 self.settings) from None

    def __call__(self, messages: list[dict]) -> str:
        """One attempt (no retry): the answer's text, or EndpointError / JudgeFatalError. A field the endpoint
        refuses is dropped and the request sent again at once: that is not a retry."""
        async def once():
            async with self.session() as ask:
                for _ in range(len(INSTEAD)):
                    try:
                        return await ask(messages)
                    except EndpointError as exc:
                        if exc.verdict != "adapted":
                            raise
                return await ask(messages)

        return run_async(once())


@dataclass
class Answer:
    """What asking one request came to: value is accept(text) of the first acceptable answer, else None."""

    value: object = None
    text: object = None  # what `ask` returned for that answer (its text, for a ChatEndpoint)
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

    A failed request is retried after backoff_s, or after the server's Retry-After (an
    EndpointError's retry_after, 0 for "at once"); one whose verdict is "final" (a 4xx
    such as 400) is not retried; a JudgeFatalError (401/403/404) propagates. `ask` may
    also be any other async callable: its failures are retried. An unacceptable answer
    (accept returns None, or raises UnusableAnswer with the reason to keep) is asked
    again at once.
    """
    reasons: list[str] = []
    attempt = adapted = 0
    while attempt < attempts:
        try:
            text = await ask(messages)
        except JudgeFatalError:
            raise
        except EndpointError as exc:  # the judge client's verdict: retry (after a wait) or not
            if exc.verdict == "adapted" and adapted < len(INSTEAD):  # a field fewer now: that was no attempt
                adapted += 1
                continue
            attempt += 1
            reasons.append(exc.reason)
            if exc.verdict == "final":
                break
            wait = exc.retry_after
        except Exception as exc:  # any other callable's failure (network, rate limit...): retried, then counted
            attempt += 1
            reasons.append(f"{type(exc).__name__}: {one_line(str(exc))}")
            wait = None
        else:
            attempt += 1
            try:
                value = accept(text)
            except UnusableAnswer as why:
                reasons.append(str(why))
                continue
            if value is not None:
                return Answer(value, text, reasons, attempt)
            reasons.append(f"unusable answer: {one_line(str(text), 80)!r}")
            continue
        if attempt < attempts:
            await asyncio.sleep(wait if wait is not None else backoff_s(attempt - 1, backoff_base_s, backoff_max_s))
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
