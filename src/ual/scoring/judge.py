"""Uncertainty from a judge LLM behind any OpenAI-compatible endpoint (docs/method.md §1).

OpenAI, vLLM, llama.cpp or Ollama: the official `openai` client talks to all
of them. Judging thousands of samples costs money and time, so:
- every answer is committed to a SQLite cache the moment it arrives (cache.py):
  a rerun, or a run after SIGKILL, sends nothing for what is already answered;
- requests run concurrently (cfg.concurrency workers) under optional request and
  token rate limits, each retried by judge_calls.ask_with_retries (the retry loop
  DEITA and the pairwise judge use too) with exponential backoff that honours
  Retry-After on 429, 5xx and time-outs (the client's own retries are off, so every
  attempt is ours, counted and visible);
- each request has a total deadline, cfg.timeout_s for connect, headers and body
  together (judge_http.py): a server trickling its body cannot hold it longer;
- a malformed body ("malformed response: empty choices") or an unparseable
  answer is retried (the latter at a small temperature, since a greedy rerun
  would repeat it) and after cfg.max_retries listed as a failure with its
  reasons: no score is ever invented;
- a wrong key (401), no access (403) or an unknown model (404) stops the run at
  once with one line saying so (JudgeFatalError): retrying cannot fix it;
- when the endpoint returns top log-probabilities the score is their expectation
  (prompt.expected_score); the sampled number is recorded next to it;
- an endpoint that refuses a request field is asked without it from then on
  (judge_http.RequestFields): no log-probabilities (the sampled number is the
  score), max_completion_tokens for max_tokens and the server's default temperature
  (OpenAI's reasoning models, o-series and gpt-5, which also need cfg.max_tokens in
  the thousands: they think before answering);
- n_samples > 1 adds draws at a small temperature and averages them.
The API key comes only from $OPENAI_API_KEY (a local base_url needs none) and is
scrubbed from every message we keep: it never reaches logs, cache or outputs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ual.config import ScoreConfig
from ual.scoring.batch_files import BATCH_DISCOUNT
from ual.sample import Sample
from ual.scoring.base import ScoreResult
from ual.scoring.cache import JudgeCache
from ual.scoring.judge_http import JudgeFatalError  # noqa: F401 - the error a run stops with, raised by judge_failure
from ual.scoring.judge_calls import (RateLimiter, UnusableAnswer, ask_with_retries, endpoint_error, estimate_tokens,
                                     run_async)
from ual.scoring.judge_http import RequestFields, open_client, post_chat, read_api_key, redact
from ual.sample_file import ids_and_sources
from ual.scoring.prompt import JudgePrompt, RenderedPrompts, answer_record, load_prompt

log = logging.getLogger(__name__)

# USD per million (input, output) tokens; a model not listed gets token counts only.
# Public list prices, mid-2025: check your provider's page before trusting a total.
PRICES_PER_MTOK = {
    "gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00), "gpt-4.1-mini": (0.40, 1.60), "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4-turbo": (10.00, 30.00), "gpt-4": (30.00, 60.00), "gpt-3.5-turbo": (0.50, 1.50),
    # reasoning models: their thinking is billed as output, so a dry run's cost, at score.max_tokens per
    # answer, is an upper bound
    "gpt-5": (1.25, 10.00), "gpt-5-mini": (0.25, 2.00), "gpt-5-nano": (0.05, 0.40),
    "o3": (2.00, 8.00), "o4-mini": (1.10, 4.40),
}


def price_for(model: str) -> tuple[float, float] | None:
    """Exact name, else the longest listed prefix ("gpt-4o-2024-08-06" -> "gpt-4o")."""
    hits = [k for k in PRICES_PER_MTOK if model == k or model.startswith(k + "-")]
    return PRICES_PER_MTOK[max(hits, key=len)] if hits else None


@dataclass
class JudgeOptions:
    """Knobs beyond ScoreConfig, with defaults that suit OpenAI and local servers alike."""

    timeout_s: float = 120.0  # total per request: connect, headers and body (judge_http.post_chat)
    max_tokens: int = 16  # the answer is one integer; room for "Score: 73"
    logprobs: bool = True  # ask for top log-probabilities (turned off if the endpoint refuses)
    top_logprobs: int = 20  # OpenAI's maximum
    extra_temperature: float = 0.7  # for draws 1..n-1 and for retries after an unparseable answer
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None  # estimated prompt + max_tokens per request
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    chars_per_token: float = 4.0  # token estimate before sending (dry run, rate limit)
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: ScoreConfig) -> JudgeOptions:
        """The knobs a config sets (score.timeout_s, score.max_tokens, the rate limits); defaults for the rest."""
        return cls(timeout_s=cfg.timeout_s, max_tokens=cfg.max_tokens, requests_per_minute=cfg.requests_per_minute,
                   tokens_per_minute=cfg.tokens_per_minute)


class JudgeScorer:
    """Scorer protocol over an OpenAI-compatible chat endpoint; see the module docstring."""

    def __init__(self, cfg: ScoreConfig, cache_path: str | Path, prompt: JudgePrompt | None = None,
                 options: JudgeOptions | None = None):
        if not cfg.model:
            raise ValueError("score.model must name the judge model for scorer 'judge'")
        if cfg.n_samples < 1 or cfg.concurrency < 1 or cfg.max_retries < 0:
            raise ValueError("score.n_samples and score.concurrency must be >= 1, score.max_retries >= 0")
        self.cfg, self.opts = cfg, options or JudgeOptions.from_config(cfg)
        self.prompt = prompt or load_prompt(cfg.prompt_file)
        self.cache_path = Path(cache_path)
        self.cache = JudgeCache(cache_path, read_only=cfg.dry_run)  # a dry run writes nothing
        self.model = cfg.model
        self.name = f"judge:{self.model}:{self.prompt.version}"
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": None}
        self.last_plan: dict | None = None
        self._fields = RequestFields(logprobs=self.opts.logprobs)  # learns what the endpoint refuses
        self.key = read_api_key()
        self.price = price_for(self.model)

    def scrub(self, text: str) -> str:
        """`text` without the API key (nothing kept or shown may hold it)."""
        return redact(text, self.key)

    # ------------------------------------------------------------------ public

    def score(self, samples: Sequence[Sample]) -> list[ScoreResult]:
        return run_async(self.ascore(samples))  # also from inside an event loop (notebooks)

    async def ascore(self, samples: Sequence[Sample]) -> list[ScoreResult]:
        rendered, hashes, rows, todo, cached = self._todo(samples)
        if self.cfg.dry_run:
            print(_plan_text(self._plan(rendered, todo, cached)))
            return [ScoreResult(sid, None, {"error": "dry run: nothing sent"}) for sid in ids_and_sources(samples)[0]]
        if todo and self.cfg.via != "chat":
            from ual.scoring.batch import BatchRun

            todo = BatchRun(self, self.cache_path).run(todo, rendered, hashes)  # the rest, for the chat path
            rows.update(self.cache.lookup(self.model, self.prompt.version, hashes))
        elif todo:
            self._refuse_beside_batches()
        if todo:
            await self._run(todo, rendered, hashes, rows)
        return [self._result(sid, h, rows, cut, h in cached)
                for sid, h, (_, cut) in zip(ids_and_sources(samples)[0], hashes, rendered)]

    def plan(self, samples: Sequence[Sample]) -> dict:
        """What a run would send: request count and estimated tokens/cost (sends nothing)."""
        rendered, _, _, todo, cached = self._todo(samples)
        return self._plan(rendered, todo, cached)

    def _plan(self, rendered, todo, cached) -> dict:
        batch = self.cfg.via != "chat" and todo
        if batch:
            from ual.scoring.batch_files import custom_id, cut_shards, request_line
        tin, sizes = 0.0, []
        for draw, msgs in _in_order(rendered, todo):  # one pass over the samples, whatever their number
            tin += estimate_tokens(msgs, 0, self.opts.chars_per_token)
            if batch:
                sizes.append((len(request_line(custom_id("0" * 64, draw), self.request_body(msgs, 0.0))),
                              estimate_tokens(msgs, self.opts.max_tokens, self.opts.chars_per_token)))
        tout = self.opts.max_tokens * len(todo)
        price = self.price
        discount = 1.0 if self.cfg.via == "chat" else BATCH_DISCOUNT  # vLLM: no bill, but the same tokens
        self.last_plan = {"judge": self.model, "prompt_version": self.prompt.version, "via": self.cfg.via,
                          "requests": len(todo), "samples_cached": len(cached), "est_prompt_tokens": int(tin),
                          "est_completion_tokens": int(tout),
                          "est_cost_usd": (tin * price[0] + tout * price[1]) * discount / 1e6 if price else None}
        if batch:
            cuts = cut_shards(sizes, self.cfg.batch_max_lines, self.cfg.batch_max_bytes,
                              self.cfg.batch_max_queued_tokens)
            self.last_plan["shards"] = [{"requests": b - a, "bytes": sum(s for s, _ in sizes[a:b]),
                                         "est_tokens": int(sum(t for _, t in sizes[a:b]))} for a, b in cuts]
        return self.last_plan

    def request_body(self, messages: list[dict], temperature: float) -> dict:
        """The chat request for these messages, as this endpoint takes it (the batch path sends the same)."""
        return self._fields.build(self.model, messages, self.opts.max_tokens, temperature, self.opts.top_logprobs)

    def drop_field(self, field: str, reason: str) -> None:
        """Go without a field the endpoint refused, for every later request (and say so, once)."""
        if self._fields.drop(field):
            log.warning("judge %s: %s", self.model, reason)

    def _refuse_beside_batches(self) -> None:
        from ual.scoring.batch_store import in_flight

        n = in_flight(self.cache_path, self.model, self.prompt.version)
        if n:
            raise ValueError(f"{n} batch(es) of judge {self.model} are still in flight for this cache: collect them "
                             "with `ual score RUN --score.via batch` (or `ual batch cancel RUN`), so no request is "
                             "paid for twice")

    def _todo(self, samples: Sequence[Sample]):
        """Render, hash, look up the cache; the (sample index, draw) pairs still to ask, once per content."""
        rendered = RenderedPrompts(self.prompt, samples)
        hashes = [_content_hash(msgs) for msgs, _ in rendered]
        rows = self.cache.lookup(self.model, self.prompt.version, hashes)
        first = {h: i for i, h in reversed(list(enumerate(hashes)))}  # identical samples: ask once
        n = self.cfg.n_samples
        todo = [(i, d) for h, i in sorted(first.items(), key=lambda x: x[1]) for d in range(n)
                if not rows.get((h, d), {}).get("ok")]
        cached = {h for h in first if all(rows.get((h, d), {}).get("ok") for d in range(n))}
        return rendered, hashes, rows, todo, cached

    # ------------------------------------------------------------------ the run

    async def _run(self, todo, rendered, hashes, rows) -> None:
        from tqdm.auto import tqdm

        # the deadline of each request is post_chat's (total); the client's own only backs it up
        client = open_client(self.key, self.cfg.base_url, self.opts.timeout_s)
        limiter = RateLimiter(self.opts.requests_per_minute, self.opts.tokens_per_minute)
        queue: asyncio.Queue = asyncio.Queue()
        for job in todo:
            queue.put_nowait(job)
        price = price_for(self.model)
        bar = tqdm(total=len(todo), unit="req", desc=f"judge {self.model}", disable=not self.opts.progress,
                   file=sys.stderr, dynamic_ncols=True)

        async def worker():
            while True:
                try:
                    i, draw = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                msgs = rendered[i][0]
                record = await self._answer(client, limiter, msgs, draw)
                self.cache.put(self.model, self.prompt.version, hashes[i], draw, record["ok"],
                               record.get("score"), record)  # committed now: survives a kill
                rows[(hashes[i], draw)] = {"ok": record["ok"], "score": record.get("score"), "record": record}
                bar.update(1)
                bar.set_postfix_str(self._usage_text(price), refresh=False)

        tasks = [asyncio.ensure_future(worker()) for _ in range(min(self.cfg.concurrency, len(todo)))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:  # a fatal error (bad key) stops every worker, not just one
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            bar.close()
            await client.close()
        log.info("judge %s: %s", self.model, self._usage_text(price))

    async def _answer(self, client, limiter: RateLimiter, msgs: list[dict], draw: int) -> dict:
        """One (sample, draw): asked until a parseable answer, cfg.max_retries retries at most (ask_with_retries).

        Draw 0 is greedy; later draws, and any attempt after an unparseable answer (a greedy
        rerun would repeat it), use opts.extra_temperature. A field the endpoint refuses
        (log-probabilities; max_tokens or a temperature, as OpenAI's reasoning models do) is
        dropped for this and every later request, and the request asked again at once.
        """
        est = estimate_tokens(msgs, self.opts.max_tokens, self.opts.chars_per_token)
        unparseable = 0

        async def ask(messages: list[dict]):
            await limiter.acquire(est)
            temperature = 0.0 if draw == 0 and unparseable == 0 else self.opts.extra_temperature
            kwargs = self.request_body(messages, temperature)
            self.stats["requests"] += 1
            try:
                reply = await post_chat(client, kwargs, self.opts.timeout_s)
            except Exception as exc:  # time-outs, HTTP errors, dropped connections, malformed bodies
                # a wrong key, no access or an unknown model raises JudgeFatalError here, with one line;
                # a field the endpoint refuses (log-probabilities, max_tokens, temperature) is dropped
                raise endpoint_error(exc, self.key, self.cfg.base_url, self.model, limiter, self._fields,
                                     kwargs) from None
            self.stats["prompt_tokens"] += reply.usage[0]
            self.stats["completion_tokens"] += reply.usage[1]
            return reply, kwargs.get("temperature")  # None: the server's default

        def accept(answer) -> dict:
            nonlocal unparseable
            (text, content, usage), temperature = answer
            record, why = answer_record(text, content, usage, temperature, self.scrub)
            if record is None:
                unparseable += 1
                raise UnusableAnswer(why)
            return record

        answer = await ask_with_retries(ask, msgs, self.cfg.max_retries + 1, accept, self.opts.backoff_base_s,
                                        self.opts.backoff_max_s)
        if answer.value is None:
            return {"ok": False, "score": None, "error": answer.error, "reasons": answer.reasons,
                    "attempts": answer.attempts}
        return {**answer.value, "attempts": answer.attempts, "reasons": answer.reasons}

    # ------------------------------------------------------------------ results

    def _result(self, sample_id: str, h: str, rows: dict, cut: int, cached: bool) -> ScoreResult:
        draws = [rows.get((h, d)) for d in range(self.cfg.n_samples)]
        good = [r["record"] for r in draws if r and r["ok"]]
        base = {"judge": self.model, "prompt_version": self.prompt.version, "content_hash": h}
        if cut:
            base["truncated_chars"] = cut
        if not good:
            failed = [r["record"] for r in draws if r]
            reasons = [x for r in failed for x in r.get("reasons", [])]
            return ScoreResult(sample_id, None, {**base, "error": failed[0]["error"] if failed else "not scored",
                                                 "reasons": reasons})
        value = sum(r["score"] for r in good) / len(good)
        first = good[0]
        details = {**base, "score_0_99": value, "sampled": first["sampled"], "expected": first["expected"],
                   "numeric_mass": first["numeric_mass"], "strict": first["strict"], "answer": first["answer"],
                   "attempts": first["attempts"], "cached": cached}
        if self.cfg.n_samples > 1:
            details["draws"] = [{k: r[k] for k in ("sampled", "expected", "temperature")} for r in good]
            details["draws_failed"] = self.cfg.n_samples - len(good)
        return ScoreResult(sample_id, value / 99.0, details)

    def _usage_text(self, price) -> str:
        tin, tout = self.stats["prompt_tokens"], self.stats["completion_tokens"]
        if price:
            self.stats["cost_usd"] = (tin * price[0] + tout * price[1]) / 1e6
        cost = f"${self.stats['cost_usd']:.4f}" if price else "cost n/a"
        return f"tok in {tin} out {tout}, {cost}"


# ---------------------------------------------------------------------- helpers

def _in_order(rendered, todo):
    """(draw, judge messages) of each (sample index, draw) of `todo` (in sample order, as _todo makes it),
    rendered in one pass over the samples rather than read back one by one."""
    prompts = enumerate(rendered)
    at, msgs = -1, None
    for i, draw in todo:
        while at < i:
            at, (msgs, _cut) = next(prompts)
        yield draw, msgs


def _content_hash(msgs: list[dict]) -> str:
    return hashlib.sha256(json.dumps(msgs, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def _plan_text(plan: dict) -> str:
    cost = f"~${plan['est_cost_usd']:.4f}" if plan["est_cost_usd"] is not None else "cost unknown (model not in price table)"
    if plan["via"] == "batch" and plan["est_cost_usd"] is not None:
        cost += " at the batch price (half the chat price)"
    shards = plan.get("shards")
    sizes = ", ".join(f"{s['requests']} requests, {s['bytes'] / 1e6:.1f} MB" for s in (shards or [])[:5])
    files = f" in {len(shards)} batch file(s) ({sizes}{', ...' if len(shards) > 5 else ''})" if shards else ""
    return (f"dry run: judge {plan['judge']} ({plan['prompt_version']}), via {plan['via']}: {plan['requests']} "
            f"requests to send{files}, {plan['samples_cached']} samples already cached; est. "
            f"{plan['est_prompt_tokens']} prompt + {plan['est_completion_tokens']} completion tokens, {cost}; nothing sent")


def build_judge_scorer(cfg: ScoreConfig, run_dir: str | Path, options: JudgeOptions | None = None) -> JudgeScorer:
    """The `ual score` entry for scorer 'judge'.

    The cache is run_dir/judge_cache.sqlite, or $UAL_JUDGE_CACHE to share one
    file across runs (answers are keyed by content, so sharing is always safe).
    """
    cache = os.environ.get("UAL_JUDGE_CACHE") or Path(run_dir) / "judge_cache.sqlite"
    return JudgeScorer(cfg, cache, options=options)
