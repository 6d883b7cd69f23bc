"""Batch request files: the judge's requests as JSONL lines, cut into shards, and their answers read back.

OpenAI's Batch API (and the OpenAI-shaped batch endpoints of other providers) and `vllm run-batch` take
the same file: one line per request, `{"custom_id", "method", "url", "body"}`, where body is exactly the
chat request the chat path sends (judge_http.RequestFields builds both). They answer with one line per
request, in any order: `{"custom_id", "response": {"status_code", "body"}, "error"}`. This module is the
pure part of batch.py: no state, no network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterable

from ual.scoring.judge_http import AnswerCutShort, MalformedResponse, one_line, parse_completion, status_verdict
from ual.scoring.prompt import answer_record

BATCH_ENDPOINT = "/v1/chat/completions"
BATCH_DISCOUNT = 0.5  # OpenAI's Batch API bills half the chat price (check your provider's page)
TERMINAL = ("completed", "failed", "expired", "cancelled")  # a batch in any other status may still answer


def custom_id(content_hash: str, draw: int) -> str:
    """A request line's id, from its answer-cache key (the judge and prompt version are the run's): an
    answer maps straight back to its cache row, and no file can ask the same thing twice."""
    return f"{content_hash}-{draw}"


def cache_key(cid: str) -> tuple[str, int]:
    content_hash, _, draw = cid.rpartition("-")
    return content_hash, int(draw)


def request_line(cid: str, body: dict) -> bytes:
    return (json.dumps({"custom_id": cid, "method": "POST", "url": BATCH_ENDPOINT, "body": body},
                       ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


class ShardCutter:
    """Consecutive request lines into shards, none over max_lines lines, max_bytes bytes or max_tokens
    estimated tokens (a provider's limits per file, and the queued-token limit a batch must fit under),
    one line at a time, so a writer never holds more than one shard."""

    def __init__(self, max_lines: int, max_bytes: int, max_tokens: float | None = None):
        self.limits = (max_lines, max_bytes, max_tokens)
        self.lines, self.bytes, self.tokens, self.seen = 0, 0, 0.0, 0

    def starts_shard(self, size: int, tokens: float) -> bool:
        """Take one line; True when it begins a new shard (the lines before it are a full one). A line over
        a limit on its own cannot be sent: ValueError naming it."""
        max_lines, max_bytes, max_tokens = self.limits
        self.seen += 1
        if size > max_bytes or (max_tokens is not None and tokens > max_tokens):
            raise ValueError(f"request {self.seen} alone is over a batch limit ({size} bytes, ~{tokens:.0f} tokens; "
                             f"score.batch_max_bytes {max_bytes}, score.batch_max_queued_tokens {max_tokens})")
        new = self.lines > 0 and (self.lines >= max_lines or self.bytes + size > max_bytes
                                  or (max_tokens is not None and self.tokens + tokens > max_tokens))
        if new:
            self.lines, self.bytes, self.tokens = 0, 0, 0.0
        self.lines, self.bytes, self.tokens = self.lines + 1, self.bytes + size, self.tokens + tokens
        return new


def cut_shards(sizes: Iterable[tuple[int, float]], max_lines: int, max_bytes: int,
               max_tokens: float | None = None) -> list[tuple[int, int]]:
    """[start, stop) of the lines of each shard, from each line's (bytes, estimated tokens) (ShardCutter)."""
    cutter, starts, n = ShardCutter(max_lines, max_bytes, max_tokens), [], 0
    for n, (size, tokens) in enumerate(sizes, 1):
        if cutter.starts_shard(size, tokens) or n == 1:
            starts.append(n - 1)
    return list(zip(starts, starts[1:] + [n]))


@dataclass
class LineOutcome:
    """What one answered (or unanswered) request line came to.

    kind: "ok" (record holds the score), "unusable" (an answer with no score in it, or a malformed body:
    asked again, at a small temperature, and counted as an attempt, as on the chat path), "retry" (a
    429, 5xx, an expired or cancelled batch: may pass in the next round), "refused:FIELD" (the endpoint
    does not take FIELD: asked again without it), "final" (this request would fail the same way again).
    """

    kind: str
    record: dict | None = None
    reason: str | None = None
    usage: tuple[int, int] = (0, 0)


def line_outcome(line: dict, temperature: float | None, sent: Iterable[str],
                 scrub: Callable[[str], str]) -> LineOutcome:
    """The outcome of one output or error line (OpenAI's and vLLM's layout); sent: the request's field names."""
    response, error = line.get("response"), line.get("error")
    if not isinstance(response, dict):
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
            return LineOutcome("retry", reason=scrub(one_line(f"batch line error {code}: {message}")))
        return LineOutcome("retry", reason="the batch returned no response for this request")
    status, body = response.get("status_code"), response.get("body")
    if status != 200:
        return _error_outcome(status, body, sent, scrub)
    try:
        reply = parse_completion(json.dumps(body).encode("utf-8"))
    except AnswerCutShort as exc:
        return LineOutcome("final", reason=str(exc))
    except MalformedResponse as exc:
        return LineOutcome("unusable", reason=scrub(f"malformed response: {exc}")[:300])
    record, why = answer_record(reply.text, reply.content, reply.usage, temperature, scrub)
    return LineOutcome("ok" if record else "unusable", record, why, reply.usage)


def _error_outcome(status, body, sent, scrub) -> LineOutcome:
    """A line the endpoint answered with an error status, judged as the chat path judges that status."""
    if not isinstance(status, int):
        return LineOutcome("retry", reason=f"a response line with no status code ({status!r})")
    detail = body.get("error", body) if isinstance(body, dict) else body
    error = SimpleNamespace(status_code=status, body=detail, message=one_line(json.dumps(detail, default=str)))
    reason, verdict = status_verdict(error, tuple(sent), scrub=scrub)
    reason = scrub(reason)[:300]
    if verdict == "fatal":  # 401/403/404 on one line: that line fails; the run goes on with the others
        return LineOutcome("final", reason=reason)
    return LineOutcome(verdict, reason=reason)


def read_lines(raw: bytes, where: str) -> tuple[list[dict], list[str]]:
    """The JSON objects of an output or error file, and a note ("FILE, line N: why") for each line that is not
    one with a custom_id: a provider's file cut short or holding junk costs those lines, never the file."""
    out, bad = [], []
    for n, text in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            bad.append(f"{where}, line {n}: not JSON ({one_line(text, 60)!r})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
            bad.append(f"{where}, line {n}: no custom_id")
            continue
        out.append(obj)
    return out, bad


def pick_answers(files: list[tuple[str, bytes]], sent: set[str]) -> tuple[dict[str, dict], list[str], int]:
    """The line answering each custom_id of `sent`, from (name, bytes) files in order of precedence (the
    output file before the error file: an answer wins over an error line; of two lines for one id, the first),
    and what was odd about them, one line per kind: unreadable lines (named), custom_ids answered more than
    once, custom_ids never sent (the first few of each); and how many lines were unreadable."""
    chosen: dict[str, dict] = {}
    bad, twice, foreign = [], [], []
    for where, raw in files:
        lines, unreadable = read_lines(raw, where)
        bad += unreadable
        for line in lines:
            cid = line["custom_id"]
            if cid not in sent:
                foreign.append(cid)
            elif cid in chosen:
                twice.append(cid)
            else:
                chosen[cid] = line
    notes = []
    if bad:
        notes.append(f"{len(bad)} unreadable line(s), their requests asked again: " + "; ".join(bad[:5])
                     + ("; ..." if len(bad) > 5 else ""))
    for ids, what in ((twice, "answered more than once (the first answer kept)"),
                      (foreign, "never sent in this batch (ignored)")):
        if ids:
            unique = list(dict.fromkeys(ids))
            notes.append(f"{len(unique)} custom_id(s) {what}: {', '.join(unique[:3])}" + (", ..." if len(unique) > 3
                                                                                          else ""))
    return chosen, notes, len(bad)
