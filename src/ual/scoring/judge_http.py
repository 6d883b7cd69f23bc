"""The package's one OpenAI-compatible judge client, one attempt: a request under a total deadline, a
body checked field by field, errors in words. Pacing and retries ("messages -> text" calls) are
in judge_calls.py, built on this.

One attempt:
- `post_chat` sends one chat completion under a total deadline (connect, headers
  and body together) and returns the checked answer;
- `parse_completion` turns a 200's body into (text, log-probabilities, usage) or
  raises MalformedResponse naming what is wrong ("empty choices");
- `RequestFields` builds the request's fields, and learns from the endpoint's 400s
  which of them it refuses: OpenAI's reasoning models (o-series, gpt-5) take
  max_completion_tokens, not max_tokens, only their default temperature, and no
  log-probabilities; llama.cpp builds without logprobs refuse those;
- `classify` turns any failure into a one-line reason and a verdict: retry,
  give up on this sample, retry at once without a field the endpoint refused, or
  stop the run;
  `judge_failure` adds the key scrubbing and, for a fatal verdict, raises
  JudgeFatalError with `fatal_message`'s one line.
- `redact` scrubs the API key (and anything shaped like one) from a message,
  `fatal_message` is the one line for an error no retry can fix.
Around it: `open_client` (the key from $OPENAI_API_KEY, the client's own retries
off).
Nothing here sees the API key except through the client. Text that comes from
the server (an error message, a body that is not JSON) may echo it: classify
passes it through the caller's scrubber (`redact` with the key) before cutting
it short, so a key cut in half cannot slip past the scrubber.
Used through judge_calls.py by judge.py (`ual score`: caching, log-probabilities,
n-sample draws), deita.py (`ual select --scorer judge`) and ual.evaluation.pairwise.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import time
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import NamedTuple

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


class AnswerCutShort(MalformedResponse):
    """A 200 whose answer is empty because it hit the token limit (finish_reason "length"): a reasoning model
    spent the budget thinking. Asking again with the same budget would end the same way."""


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


def open_sync_client(key: str, base_url: str | None, timeout_s: float):
    """A blocking OpenAI client for the batch path's files and batches calls (batch.py): few, small
    requests, each retried twice by the client itself (a create is sent with retries off: a batch
    created twice is paid twice)."""
    from openai import OpenAI

    key = key or (NO_KEY_PLACEHOLDER if base_url else "")
    if not key:
        raise JudgeFatalError("OPENAI_API_KEY is not set (it is read from the environment only)")
    return OpenAI(api_key=key, base_url=base_url, max_retries=2, timeout=timeout_s)


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
    if choices is None and resp.get("error") is not None:  # some gateways send their errors with status 200
        err = resp["error"]
        msg = err.get("message") or json.dumps(err) if isinstance(err, dict) else str(err)
        raise MalformedResponse(f"an error with status 200: {one_line(str(msg), 120)}")
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
    if isinstance(text, list) and text and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in text):
        text = "".join(p["text"] for p in text)  # content as a list of text parts (some gateways)
    if not (isinstance(text, str) and text.strip()):  # no answer: say why when the body does
        finish, refusal = choice.get("finish_reason"), message.get("refusal")
        if finish == "length":
            raise AnswerCutShort("the answer hit the token limit before any text (finish_reason 'length'): a "
                                 "reasoning model thinks first; give the judge more max_tokens")
        if isinstance(refusal, str) and refusal.strip():
            raise MalformedResponse(f"the model refused: {one_line(refusal, 120)!r}")
        if finish == "content_filter":
            raise MalformedResponse("the endpoint's content filter withheld the answer (finish_reason 'content_filter')")
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


# ---------------------------------------------------------------------- the request

class RequestFields:
    """A chat request's fields, as this endpoint takes them; one per run, shared by its requests.

    Starts as most servers take it (max_tokens, temperature, log-probabilities if asked);
    `drop(field)` records a field the endpoint refused (classify's "refused:FIELD"
    verdict), so every later request goes without it: max_tokens becomes
    max_completion_tokens (OpenAI's reasoning models), a refused temperature is left to
    the server's default, refused log-probabilities are not asked for.
    """

    def __init__(self, logprobs: bool = True):
        self.logprobs, self.temperature, self.tokens_field = logprobs, True, "max_tokens"

    def build(self, model: str, messages: list[dict], max_tokens: int, temperature: float,
              top_logprobs: int = 0) -> dict:
        kwargs = {"model": model, "messages": messages, self.tokens_field: max_tokens}
        if self.temperature:
            kwargs["temperature"] = temperature
        if self.logprobs and top_logprobs:
            kwargs.update(logprobs=True, top_logprobs=top_logprobs)
        return kwargs

    def drop(self, field: str) -> bool:
        """Go without `field` from now on; False if that was already so (another request learned it first)."""
        before = (self.logprobs, self.temperature, self.tokens_field)
        if field == "logprobs":
            self.logprobs = False
        elif field == "temperature":
            self.temperature = False
        elif field == "max_tokens":
            self.tokens_field = "max_completion_tokens"
        else:
            raise ValueError(f"no way to go without {field!r}")
        return before != (self.logprobs, self.temperature, self.tokens_field)


INSTEAD = {"logprobs": "without log-probabilities (the sampled number is the score)",
           "temperature": "at the server's default temperature", "max_tokens": "with max_completion_tokens"}


def refused_field(exc, reason: str, sent) -> str | None:
    """The field a 400 says the endpoint does not take, among those `sent` that can go: by the error's
    `param` (OpenAI's) or by name in its message."""
    body = getattr(exc, "body", None)
    param = body.get("param") if isinstance(body, dict) else None
    if "logprobs" in sent and (param in ("logprobs", "top_logprobs") or "logprob" in reason.lower()):
        return "logprobs"
    for field in ("max_tokens", "temperature"):
        if field in sent and (param == field or re.search(rf"(?<!\w){field}(?!\w)", reason)):
            return field
    return None


# ---------------------------------------------------------------------- failures

def classify(exc: BaseException, sent=(), scrub=lambda text: text) -> tuple[str, str]:
    """(one-line reason, verdict) for a failed attempt; `sent`: the request's field names; scrub(text) removes
    the key from server text. Verdicts:
    "retry": transient (time-out, dropped connection, 408/409/429, 5xx, malformed body: a glitch may pass);
    "final": this request would fail the same way again (other 4xx, an answer cut short by the token
    limit): the sample is listed as failed now;
    "refused:FIELD": a 400 refusing a field the request can go without (max_tokens, temperature,
    logprobs): RequestFields.drop(FIELD), then ask again at once;
    "fatal": retrying cannot help any sample (401 wrong key, 403 no access, 404 unknown model): stop the run.
    """
    import openai

    if isinstance(exc, AnswerCutShort):
        return str(exc), "final"
    if isinstance(exc, MalformedResponse) and exc.body is not None:
        return f"{exc}: {one_line(scrub(exc.body), 80)!r}", "retry"
    if isinstance(exc, (DeadlineExceeded, MalformedResponse)):
        return str(exc), "retry"
    if isinstance(exc, openai.APITimeoutError):  # the client's own per-read time-out, before the deadline
        return "timed out (no data within score.timeout_s)", "retry"
    if isinstance(exc, openai.APIStatusError):
        return status_verdict(exc, sent, scrub)
    if isinstance(exc, openai.APIConnectionError):  # refused, reset, closed without an answer
        cause = exc.__cause__ or exc.__context__
        detail = f"{type(cause).__name__}: {cause}" if cause is not None and str(cause) else str(exc)
        return f"connection failed ({one_line(scrub(detail))})", "retry"
    return f"{type(exc).__name__}: {one_line(scrub(str(exc)))}", "retry"  # anything else: as before, retried


def status_verdict(exc, sent=(), scrub=lambda text: text) -> tuple[str, str]:
    """classify's (reason, verdict) for an error status. exc: an APIStatusError, or anything with its
    status_code, body (the error object) and message: a batch output line's error (batch_files.py)."""
    status, reason = exc.status_code, http_reason(exc, scrub)
    if status in (401, 403, 404):
        return reason, "fatal"
    field = refused_field(exc, reason, sent) if status == 400 else None
    if field:
        return f"endpoint refused {field}; asking {INSTEAD[field]} ({reason})", f"refused:{field}"
    if 400 <= status < 500 and status not in (408, 409, 429):
        return reason, "final"
    return reason, "retry"


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
    return f"HTTP {status}{' ' + phrase if phrase else ''}: {one_line(scrub(str(msg)))}"


def one_line(text: str, limit: int = 200) -> str:
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
        if base_url and not re.search(r"/v\d+/?$", base_url):  # vLLM, llama.cpp, Ollama serve under /v1
            hint += f"; OpenAI-compatible servers answer under /v1: {where.rstrip('/')}/v1?"
    return f"judge endpoint {where} answered {reason} ({hint})"


def judge_failure(exc: BaseException, key: str, base_url: str | None, model: str, sent=(),
                  model_setting: str = "score.model", url_setting: str = "score.base_url") -> tuple[str, str]:
    """classify(exc) with the key scrubbed: (reason, verdict); a "fatal" verdict raises JudgeFatalError.

    Call it inside the `except` that caught exc: the error it raises drops exc as its context,
    so no traceback shows the unscrubbed original.
    """
    def scrub(text: str) -> str:
        return redact(text, key)

    reason, verdict = classify(exc, sent, scrub=scrub)
    reason = scrub(reason)[:300]  # belt and braces: nothing unscrubbed is kept
    if verdict == "fatal":
        raise JudgeFatalError(scrub(fatal_message(reason, base_url, model, model_setting, url_setting))) from None
    return reason, verdict
