"""`ual select`: DEITA-style data selection (Liu et al. 2023), as the paper built ShareGPT-6k and MetaMath-6k.

    ual select --source sharegpt-v3 --path ShareGPT_V3_unfiltered_cleaned_split.json \\
               --n 6000 --out data/paper/sharegpt-6k.jsonl \\
               --scorer local --complexity-model hkust-nlp/deita-complexity-scorer \\
               --quality-model hkust-nlp/deita-quality-scorer --embed-model mistralai/Mistral-7B-v0.1

1. Score. For each user/assistant turn t of a sample, a judge gives the instruction's
   complexity c_t and the response's quality q_t (1-6, DEITA's prompts); the sample's
   score is sum_t c_t * q_t (DEITA's "evol score"; --turns first scores only the first
   turn). Two judges plug in through one interface (`DeitaScorer`):
   - `LocalDeitaScorer`: a transformers causal LM read the way DEITA reads its published
     scorer models: the next-token distribution over "1".."6" after the prompt, and its
     expectation (no sampling, no parsing);
   - `ChatJudgeScorer`: any callable messages -> text, e.g. an OpenAI-compatible
     endpoint (`openai_complete`, a ChatEndpoint of the package's judge client,
     ual.scoring.judge_http, the one `ual score` uses: total deadline per request,
     retry after Retry-After, 401/403/404 stop the run with one line, the key never
     shown), answer parsed as one integer 1-6, retried when it is not one (the client's
     retry loop, judge_calls.ask_with_retries); a sample the judge never scores is
     counted as failed, never given a default.
   Scores are appended to OUT.scores.jsonl as they come, so a killed run resumes.
2. Diversity filter. Samples in decreasing score order; a sample is kept unless the
   cosine similarity of its embedding to one already kept is >= --threshold (0.95).
   Embeddings: mean-pooled final hidden states of --embed-model over the rendered
   conversation. Embedding is lazy: it stops as soon as --n are kept.
3. Write OUT (JSONL, `messages` layout, in selection order, meta.deita = the scores)
   and OUT.stats.json. The input is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Protocol, Sequence

from ual.sample import Sample
from ual.scoring.judge_calls import EndpointError  # noqa: F401 - what one failed openai_complete(...) call raises
from ual.scoring.judge_calls import ChatEndpoint, complete_all
from ual.scoring.prompt import after_reasoning

log = logging.getLogger(__name__)

# DEITA's scorer prompts (hkust-nlp/deita, deita/selection/scorer), verbatim up to whitespace.
COMPLEXITY_PROMPT = ("You are a helpful assistant. Please identify the complexity score of the following user query. \n"
                     "##Query: {instruction}  \n##Complexity: ")
QUALITY_PROMPT = ("You are a helpful assistant. Please identify the quality score of the Response corresponding to "
                  "the Question. \n #Question#:\n{instruction}\n#Response#:\n{response} \n##Quality: ")
# For chat judges: ask for the bare number, on the same 1-6 scale.
JUDGE_SUFFIX = "\n\nAnswer with a single integer from 1 (lowest) to 6 (highest) and nothing else."
SCALE = (1, 6)


class DeitaScorer(Protocol):
    name: str

    def complexity(self, instructions: Sequence[str]) -> list[float | None]: ...

    def quality(self, pairs: Sequence[tuple[str, str]]) -> list[float | None]: ...


# --------------------------------------------------------------------------- judges

def parse_scale(text: str | None, lo: int = SCALE[0], hi: int = SCALE[1]) -> int | None:
    """The judge's integer on the lo-hi scale, or None (no number, several different numbers, out of range, cut
    while reasoning); only what follows a reasoning block counts."""
    answer = after_reasoning(text) if text else None
    if answer is None:
        return None
    nums = re.findall(r"(?<![\d.])-?\d+(?:\.\d+)?(?!\.?\d)", answer[1])
    if not nums:
        return None
    vals = {float(n) for n in nums}
    if len(vals) != 1:
        return None
    v = vals.pop()
    return int(v) if v.is_integer() and lo <= v <= hi else None


class ChatJudgeScorer:
    """DEITA scoring by a chat judge: `complete(messages) -> text` (an OpenAI-compatible endpoint, or any callable).

    Each prompt gets up to `retries` attempts; a failed request and an answer that is not
    one integer 1-6 both use one. A failed request is retried after an exponential
    backoff (backoff_base_s * 2^attempt, jittered, at most backoff_max_s) or after the
    server's Retry-After. With a ChatEndpoint (`openai_complete`) the verdict is the
    package judge client's (ual.scoring.judge_http.classify): a request that would fail the
    same way again (a 4xx such as 400) is not retried, and a wrong key, no access or an
    unknown model (401/403/404) stops the run with one line (JudgeFatalError).
    At most `concurrency` requests are in flight. The loop is the judge client's
    (judge_calls.ask_all / ask_with_retries), shared with the pairwise judge.
    """

    def __init__(self, complete: Callable[[list[dict]], str], name: str = "chat-judge", retries: int = 3,
                 concurrency: int = 4, backoff_base_s: float = 1.0, backoff_max_s: float = 60.0):
        self.complete, self.name, self.retries, self.concurrency = complete, name, retries, concurrency
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.failures: list[str] = []  # the last reason of each prompt left unscored

    def _map(self, prompts: list[str]) -> list[float | None]:
        answers = complete_all(self.complete, [[{"role": "user", "content": p + JUDGE_SUFFIX}] for p in prompts],
                               self.retries, parse_scale, self.concurrency, self.backoff_base_s, self.backoff_max_s)
        self.failures += [a.error[:200] for a in answers if a.value is None]
        return [None if a.value is None else float(a.value) for a in answers]

    def complexity(self, instructions):
        return self._map([COMPLEXITY_PROMPT.format(instruction=i) for i in instructions])

    def quality(self, pairs):
        return self._map([QUALITY_PROMPT.format(instruction=i, response=r) for i, r in pairs])


def openai_complete(model: str, base_url: str | None = None, max_tokens: int = 8, timeout_s: float = 120.0,
                    requests_per_minute: float | None = None, tokens_per_minute: float | None = None) -> ChatEndpoint:
    """messages -> text from an OpenAI-compatible endpoint at temperature 0, through the judge client.

    One call is one attempt (no retry): the answer's text, or EndpointError (reason, verdict,
    Retry-After) / JudgeFatalError naming --judge-model and --base-url (see judge_calls.ChatEndpoint).
    """
    return ChatEndpoint(model, base_url, max_tokens, timeout_s, requests_per_minute, tokens_per_minute,
                        model_setting="--judge-model", url_setting="--base-url")


class LocalDeitaScorer:
    """A causal LM read like DEITA's published scorers: E[k] under softmax over the logits of "1".."6"."""

    def __init__(self, complexity_model: str, quality_model: str | None = None, device: str = "auto",
                 batch_size: int = 8, max_length: int = 2048, models: dict | None = None):
        self.name = f"local:{complexity_model}|{quality_model or complexity_model}"
        self.batch_size, self.max_length, self.device = batch_size, max_length, device
        self._names = {"complexity": complexity_model, "quality": quality_model or complexity_model}
        self._loaded = dict(models or {})  # name -> (model, tokenizer)

    def _get(self, which: str):
        name = self._names[which]
        if name not in self._loaded:
            from ual.models import load_model, load_tokenizer

            self._loaded[name] = (load_model(name, self.device).eval(), load_tokenizer(name))
        return self._loaded[name]

    @staticmethod
    def digit_ids(tokenizer) -> list[int]:
        ids = []
        for k in range(SCALE[0], SCALE[1] + 1):
            toks = tokenizer.encode(str(k), add_special_tokens=False)
            ids.append(toks[-1])  # sentencepiece may prefix a space piece: the digit is the last
        if len(set(ids)) != len(ids):
            raise ValueError(f"the tokenizer does not have distinct tokens for the digits 1-6: {ids}")
        return ids

    def _expected(self, which: str, prompts: list[str]) -> list[float | None]:
        import torch

        from ual.batching import pad_batch, pad_id, positions

        model, tok = self._get(which)
        ids = self.digit_ids(tok)
        scale = torch.arange(SCALE[0], SCALE[1] + 1, dtype=torch.float32)
        dev = next(model.parameters()).device
        out: list[float | None] = []
        for i in range(0, len(prompts), self.batch_size):
            enc = [tok(p, add_special_tokens=True)["input_ids"][-self.max_length:] for p in prompts[i:i + self.batch_size]]
            input_ids, mask = pad_batch(enc, pad_id(tok), "left")  # every prompt's last token in the last column
            input_ids, mask = input_ids.to(dev), mask.to(dev)
            pos = positions(mask)  # as if unpadded: batch-invariant
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            p = torch.softmax(logits[:, ids].float(), -1).cpu()
            out += (p @ scale).tolist()
        return out

    def complexity(self, instructions):
        return self._expected("complexity", [COMPLEXITY_PROMPT.format(instruction=i) for i in instructions])

    def quality(self, pairs):
        return self._expected("quality", [QUALITY_PROMPT.format(instruction=i, response=r) for i, r in pairs])


# --------------------------------------------------------------------------- scores

def turns(sample: Sample, which: str = "all") -> list[tuple[str, str]]:
    """(instruction, response) per assistant turn; the instruction is the user turn before it."""
    pairs, last_user = [], None
    for m in sample.messages:
        if m["role"] == "user":
            last_user = m["content"]
        elif m["role"] == "assistant" and last_user is not None:
            pairs.append((last_user, m["content"]))
            last_user = None
    return pairs[:1] if which == "first" else pairs


def score_samples(samples: Sequence[Sample], scorer: DeitaScorer, which_turns: str = "all",
                  cache_path: str | os.PathLike | None = None, chunk: int = 64) -> dict[str, dict]:
    """id -> {"complexity": [...], "quality": [...], "score": sum c*q or None}; cached line by line."""
    done: dict[str, dict] = {}
    if cache_path and Path(cache_path).exists():
        with open(cache_path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: rescored
                if row.get("scorer") == scorer.name and row.get("turns") == which_turns:
                    done[row["id"]] = row
    todo = [s for s in samples if s.id not in done]
    log.info("select: %d samples to score (%d cached)", len(todo), len(samples) - len(todo))
    fh = open(cache_path, "a", encoding="utf-8") if cache_path else None
    try:
        for i in range(0, len(todo), chunk):
            part = todo[i:i + chunk]
            pairs = [turns(s, which_turns) for s in part]
            flat = [p for ps in pairs for p in ps]
            cs = scorer.complexity([p[0] for p in flat])
            qs = scorer.quality(flat)
            k = 0
            for s, ps in zip(part, pairs):
                c, q = cs[k:k + len(ps)], qs[k:k + len(ps)]
                k += len(ps)
                ok = ps and all(x is not None for x in c + q)
                row = {"id": s.id, "scorer": scorer.name, "turns": which_turns, "complexity": c, "quality": q,
                       "score": float(sum(a * b for a, b in zip(c, q))) if ok else None}
                done[s.id] = row
                if fh:
                    fh.write(json.dumps(row) + "\n")
            if fh:
                fh.flush()
                os.fsync(fh.fileno())
            log.info("select: scored %d / %d", min(i + chunk, len(todo)), len(todo))
    finally:
        if fh:
            fh.close()
    return done


# --------------------------------------------------------------------------- diversity

class MeanPoolEmbedder:
    """Mean of the final hidden states over the (non-padding) tokens of the rendered conversation, L2-normalised."""

    def __init__(self, model_name: str, device: str = "auto", batch_size: int = 8, max_length: int = 2048,
                 model=None, tokenizer=None):
        from ual.models import load_model, load_tokenizer

        self.model = (model or load_model(model_name, device)).eval()
        self.tokenizer = tokenizer or load_tokenizer(model_name)
        self.batch_size, self.max_length = batch_size, max_length
        self.name = model_name

    def text(self, sample: Sample) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(sample.messages, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in sample.messages)

    def __call__(self, samples: Sequence[Sample]):
        import torch

        from ual.batching import pad_batch, pad_id

        dev = next(self.model.parameters()).device
        outs = []
        for i in range(0, len(samples), self.batch_size):
            enc = [self.tokenizer(self.text(s), add_special_tokens=False)["input_ids"][:self.max_length]
                   for s in samples[i:i + self.batch_size]]
            ids, mask = pad_batch(enc, pad_id(self.tokenizer), "right")
            ids, mask = ids.to(dev), mask.to(dev)
            with torch.no_grad():
                out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            h = out.hidden_states[-1].float()
            m = mask.unsqueeze(-1).float()
            v = (h * m).sum(1) / m.sum(1).clamp_min(1)
            outs.append(torch.nn.functional.normalize(v, dim=-1).cpu())
        return torch.cat(outs)


def diversity_filter(ordered: Sequence[Sample], embed: Callable[[Sequence[Sample]], "object"], n: int,
                     threshold: float = 0.95, batch_size: int = 32) -> tuple[list[Sample], dict]:
    """Greedy: walk `ordered` (best first), keep a sample unless cos(it, some kept) >= threshold; stop at n.

    `embed(samples)` returns one vector per sample (normalised here anyway).
    """
    import torch

    kept: list[Sample] = []
    vecs: list = []
    dropped, considered, nearest = 0, 0, []
    for i in range(0, len(ordered), batch_size):
        batch = ordered[i:i + batch_size]
        emb = torch.nn.functional.normalize(torch.as_tensor(embed(batch), dtype=torch.float32), dim=-1)
        for s, e in zip(batch, emb):
            considered += 1
            if vecs:
                sim = float((torch.stack(vecs) @ e).max())
                if sim >= threshold:
                    dropped += 1
                    nearest.append(sim)
                    continue
            kept.append(s)
            vecs.append(e)
            if len(kept) >= n:
                return kept, {"considered": considered, "dropped_similar": dropped}
    return kept, {"considered": considered, "dropped_similar": dropped}


# --------------------------------------------------------------------------- the command

def select(samples: Sequence[Sample], scorer: DeitaScorer, embed, n: int, threshold: float = 0.95,
           which_turns: str = "all", cache_path=None) -> tuple[list[Sample], dict]:
    scores = score_samples(samples, scorer, which_turns, cache_path)
    scored = [s for s in samples if scores[s.id]["score"] is not None]
    failed = len(samples) - len(scored)
    order = sorted(range(len(scored)), key=lambda i: (-scores[scored[i].id]["score"], i))  # stable on ties
    ordered = [scored[i] for i in order]
    kept, stats = diversity_filter(ordered, embed, n, threshold)
    for s in kept:
        s.meta["deita"] = {k: scores[s.id][k] for k in ("complexity", "quality", "score")}
    values = sorted(scores[s.id]["score"] for s in kept)
    stats.update(pool=len(samples), failed_scoring=failed, requested=n, selected=len(kept), threshold=threshold,
                 scorer=scorer.name, turns=which_turns,
                 kept_score_min=values[0] if values else None, kept_score_max=values[-1] if values else None)
    if len(kept) < n:
        log.warning("select: only %d samples kept of %d requested (pool %d, %d failed scoring, %d too similar)",
                    len(kept), n, len(samples), failed, stats["dropped_similar"])
    return kept, stats


def add_arguments(p) -> None:
    p.add_argument("--source", required=True, help="pool: a paper source name (sharegpt-v3, metamathqa, lima, "
                   "deita-6k), a packaged source (sharegpt, gsm8k) or a local .jsonl/.json/.parquet file")
    p.add_argument("--path", help="local file (published layout) for a named paper source")
    p.add_argument("--format", default="auto", help="row format of a local file (auto | messages | sharegpt | ...)")
    p.add_argument("--on-error", default="raise", choices=("raise", "skip"), help="malformed rows: raise or skip (counted)")
    p.add_argument("--n", type=int, required=True, help="number of samples to select (6000 for the paper's 6k sets)")
    p.add_argument("--out", required=True, help="output JSONL (messages layout, selection order)")
    p.add_argument("--scorer", default="local", choices=("local", "judge"),
                   help="local: causal LMs read like DEITA's scorers; judge: an OpenAI-compatible chat endpoint")
    p.add_argument("--complexity-model", default="hkust-nlp/deita-complexity-scorer", help="local scorer for complexity")
    p.add_argument("--quality-model", default="hkust-nlp/deita-quality-scorer", help="local scorer for quality")
    p.add_argument("--judge-model", default="gpt-4o", help="model name at the judge endpoint")
    p.add_argument("--base-url", default=None, help="judge endpoint (OpenAI-compatible); key from $OPENAI_API_KEY")
    p.add_argument("--concurrency", type=int, default=4, help="judge requests in flight")
    p.add_argument("--attempts", type=int, default=3,
                   help="judge attempts per prompt (a failed request and an answer that is not 1-6 each use one)")
    p.add_argument("--timeout-s", type=float, default=120.0,
                   help="seconds per judge request, connect, headers and body together; then it is retried")
    p.add_argument("--max-tokens", type=int, default=8,
                   help="judge answer budget in tokens; a reasoning judge (OpenAI o-series, gpt-5) needs thousands")
    p.add_argument("--requests-per-minute", type=float, default=None, help="judge request rate limit (default: none)")
    p.add_argument("--tokens-per-minute", type=float, default=None,
                   help="judge token rate limit, on estimated prompt + answer tokens (default: none)")
    p.add_argument("--embed-model", default="mistralai/Mistral-7B-v0.1", help="model whose mean-pooled hidden states are the embeddings")
    p.add_argument("--threshold", type=float, default=0.95, help="drop a sample whose cosine similarity to a kept one is >= this")
    p.add_argument("--turns", default="all", choices=("all", "first"), help="score every turn (sum of c*q) or the first only")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (local scorer, embeddings)")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per scored or embedded text")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--force", action="store_true", help="replace an existing output file")


def run(args) -> dict:
    from ual.config import SourceConfig
    from ual.data.formats import DataError
    from ual.data.sources import input_path, load_source
    from ual.io import write_json, write_jsonl

    out = Path(args.out)
    spec = SourceConfig(name=args.source, path=args.path, format=args.format)
    src = input_path(spec)
    if src is not None and src.resolve() == out.resolve():
        raise DataError(f"--out {out} is the input file; it would be overwritten")
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists; pass --force to replace it")
    if not 0 < args.threshold <= 1 or args.n <= 0:
        raise ValueError("--n must be positive and --threshold in (0, 1]")
    if args.attempts < 1 or args.concurrency < 1 or args.max_tokens < 1 or args.timeout_s <= 0:
        raise ValueError("--attempts, --concurrency and --max-tokens must be >= 1, --timeout-s positive")
    samples, load_stats = load_source(spec, None, args.on_error)
    if args.scorer == "judge":
        endpoint = openai_complete(args.judge_model, args.base_url, args.max_tokens, timeout_s=args.timeout_s,
                                   requests_per_minute=args.requests_per_minute,
                                   tokens_per_minute=args.tokens_per_minute)
        scorer = ChatJudgeScorer(endpoint, name=f"judge:{args.judge_model}", retries=args.attempts,
                                 concurrency=args.concurrency)
    else:
        scorer = LocalDeitaScorer(args.complexity_model, args.quality_model, args.device, args.batch_size, args.max_length)
    embed = MeanPoolEmbedder(args.embed_model, args.device, args.batch_size, args.max_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept, stats = select(samples, scorer, embed, args.n, args.threshold, args.turns,
                         cache_path=str(out) + ".scores.jsonl")
    write_jsonl(out, ({"messages": s.messages, "id": s.id, "source": s.source, "meta": s.meta} for s in kept))
    stats.update(source=args.source, input=load_stats.get("path"), embed_model=args.embed_model,
                 load=load_stats, out=str(out))
    write_json(str(out) + ".stats.json", stats)
    return {k: stats[k] for k in ("pool", "failed_scoring", "considered", "dropped_similar", "selected", "out")}
