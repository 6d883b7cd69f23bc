"""Pairwise preference between two models' answers (AlpacaEval / the paper's GPT-4 pairwise).

A judge is any callable `judge(instruction, answer_a, answer_b) -> "A" | "B" |
"tie" | None` (None: no usable verdict). Two come with ual:
- `LocalPairwiseJudge`: a transformers model reads PAIRWISE_PROMPT and the
  verdict is whichever of "A" / "B" it gives the higher next-token probability
  (no server, no sampling; "tie" within `tie_margin` nats);
- `OpenAIPairwiseJudge`: any OpenAI-compatible endpoint (OpenAI, vLLM,
  llama.cpp) through the package's judge client (ual.scoring.judge_http, as
  `ual score` and `ual select`): a total deadline per request, transient
  failures (5xx, 429, time-outs, dropped connections, malformed bodies) retried
  after a backoff or the server's Retry-After, a wrong key / no access / unknown
  model (401/403/404) stopping the run with one line, the key from
  $OPENAI_API_KEY only and never shown; answers cached in the scoring stage's
  SQLite JudgeCache when a cache path is given.

`pairwise_win_rate` asks each question in both orders (A,B) and (B,A), so a
judge that always prefers the first position gives a tie, not a win. Per
instruction model A's preference is the mean over the valid verdicts of
1 (win), 0.5 (tie), 0 (loss); the win rate is its mean over instructions with
at least one valid verdict (ties count half, as in AlpacaEval).

Length-controlled win rate (in the spirit of AlpacaEval 2's LC): judges favour
longer answers, so we fit a logistic regression of the preference on the
length difference, p(A preferred) = sigmoid(t0 + t1 * tanh((len_a - len_b) / s)),
with lengths in words, s the standard deviation of the differences, fractional
preferences entering as weighted 0/1 rows; the LC win rate is the prediction at
zero length difference, sigmoid(t0). With no length spread or a single outcome
class it falls back to the raw win rate (`lc_method` says which).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re

from ual.io import write_json
from ual.scoring.judge_calls import ChatEndpoint, complete_all
from ual.scoring.prompt import after_reasoning

log = logging.getLogger(__name__)

PAIRWISE_PROMPT = """You are comparing two responses to the same instruction. Choose the response that \
follows the instruction better: more helpful, correct and relevant. Neither the order of the responses nor \
their length should sway you.

[Instruction]
{instruction}

[Response A]
{answer_a}

[Response B]
{answer_b}

Which response is better? Answer with a single letter: A or B."""
PROMPT_VERSION = "pairwise-v1"


def _normalise_verdict(v) -> str | None:
    if v is None:
        return None
    v = str(v).strip().lower()
    return {"a": "A", "b": "B", "tie": "tie"}.get(v)


def parse_verdict(text: str | None) -> str | None:
    """"A", "B" or "tie" from a judge's text answer ("A", "Response B", "[[A]]", "tie"); None if unclear.
    Only what follows a reasoning block counts."""
    answer = after_reasoning(text) if text else None
    if answer is None:
        return None
    t = answer[1].strip()
    m = re.fullmatch(r"\W*(?:response\s+)?([AB])\W*", t, re.IGNORECASE)
    if m:
        return m.group(1).upper()
    if re.fullmatch(r"\W*tie\W*", t, re.IGNORECASE):
        return "tie"
    found = set(re.findall(r"\[\[([AB])\]\]|\b(?:Response|Answer|Output)\s+([AB])\b", t))
    letters = {a or b for a, b in found}
    return letters.pop() if len(letters) == 1 else None


class LocalPairwiseJudge:
    """Verdict from a local causal LM: log p("A") vs log p("B") as its next token after the prompt."""

    def __init__(self, model, tokenizer, template: str = PAIRWISE_PROMPT, tie_margin: float = 0.0,
                 max_answer_chars: int = 2000, batch_size: int = 4, name: str = "local"):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.tie_margin, self.max_answer_chars, self.batch_size = tie_margin, max_answer_chars, batch_size
        self.name = name

    def _context(self, instruction: str, a: str, b: str) -> str:
        cut = self.max_answer_chars
        text = self.template.format(instruction=instruction, answer_a=a[:cut], answer_b=b[:cut])
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)

    def margins(self, triples: list[tuple[str, str, str]]) -> list[float]:
        """log p(A) - log p(B) for each (instruction, answer_a, answer_b); variants like " A" count too."""
        import torch

        from ual.evaluation.multiple_choice import _letter_tokens, next_token_logprobs

        letters = _letter_tokens(self.tokenizer, 2)
        logps = next_token_logprobs(self.model, self.tokenizer, [self._context(*t) for t in triples],
                                    self.batch_size)
        out = []
        for logp in logps:
            la = torch.logsumexp(logp[letters[0]], 0).item()
            lb = torch.logsumexp(logp[letters[1]], 0).item()
            out.append(la - lb)
        return out

    def judge_many(self, triples: list[tuple[str, str, str]]) -> list[str]:
        return [("tie" if abs(m) <= self.tie_margin else "A" if m > 0 else "B") for m in self.margins(triples)]

    def __call__(self, instruction: str, answer_a: str, answer_b: str) -> str:
        return self.judge_many([(instruction, answer_a, answer_b)])[0]


class OpenAIPairwiseJudge:
    """Verdicts from an OpenAI-compatible chat endpoint, through the package's judge client.

    Each prompt gets up to max_retries + 1 attempts (judge_calls.ask_with_retries): a
    failed request is retried after a backoff or the server's Retry-After, unless it would
    fail the same way again (a 4xx such as 400); a wrong key, no access or an unknown
    model (401/403/404) raises JudgeFatalError at once, one line naming the endpoint and
    the settings to check (eval.pairwise_judge, score.base_url). A prompt whose requests
    all failed gets no verdict (None, counted invalid; its reasons in `failures`); an
    answer that names no verdict is not asked again (temperature 0 would repeat it).
    `timeout`: seconds per request, connect, headers and body together. At most
    `concurrency` requests are in flight (judge_many). The key comes from
    $OPENAI_API_KEY only (a base_url endpoint may need none).
    """

    def __init__(self, model: str, base_url: str | None = None, template: str = PAIRWISE_PROMPT,
                 cache_path=None, max_tokens: int = 8, timeout: float = 120.0, max_retries: int = 2,
                 concurrency: int = 4, backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 requests_per_minute: float | None = None, tokens_per_minute: float | None = None):
        if max_retries < 0 or concurrency < 1:
            raise ValueError("max_retries must be >= 0 and concurrency >= 1")
        self.endpoint = ChatEndpoint(model, base_url, max_tokens, timeout, requests_per_minute, tokens_per_minute,
                                     model_setting="eval.pairwise_judge", url_setting="score.base_url")
        self.endpoint.check_key()  # no key for the OpenAI API: say so now, not at the first request
        self.model, self.template, self.max_tokens = model, template, max_tokens
        self.attempts, self.concurrency = max_retries + 1, concurrency
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.name = f"pairwise:{model}"
        self.failures: list[str] = []  # the last reason of each prompt left without a verdict
        self.cache = None
        if cache_path is not None:
            from ual.scoring.cache import JudgeCache

            self.cache = JudgeCache(cache_path)

    def _messages(self, instruction: str, answer_a: str, answer_b: str) -> list[dict]:
        return [{"role": "user", "content": self.template.format(
            instruction=instruction, answer_a=answer_a, answer_b=answer_b)}]

    def judge_many(self, triples: list[tuple[str, str, str]]) -> list[str | None]:
        """The verdict for each (instruction, answer_a, answer_b); each distinct prompt asked once, cached."""
        messages = [self._messages(*t) for t in triples]
        keys = [hashlib.sha256(json.dumps(m, ensure_ascii=False).encode()).hexdigest() for m in messages]
        verdicts: dict[str, str | None] = {}
        if self.cache is not None:
            for (key, _), hit in self.cache.lookup(self.name, PROMPT_VERSION, keys).items():
                if hit["ok"]:
                    verdicts[key] = hit["record"]["verdict"]
        todo = {k: m for k, m in zip(keys, messages) if k not in verdicts}  # distinct prompts still to ask
        asked = list(todo)

        def on_answer(i: int, answer) -> None:  # as each arrives: a verdict is committed at once
            key = asked[i]
            if answer.value is None:  # every request failed: no verdict, never a default
                verdicts[key] = None
                self.failures.append(answer.error[:200])
                log.warning("pairwise judge %s: no verdict after %d attempts: %s", self.model, answer.attempts,
                            answer.error)
                record = {"verdict": None, "error": answer.error, "reasons": answer.reasons}
            else:
                verdicts[key] = parse_verdict(answer.text)
                record = {"verdict": verdicts[key], "text": answer.text[:500]}
            if self.cache is not None:
                score = {"A": 1.0, "B": 0.0, "tie": 0.5}.get(verdicts[key])
                self.cache.put(self.name, PROMPT_VERSION, key, 0, verdicts[key] is not None, score, record)

        complete_all(self.endpoint, list(todo.values()), self.attempts, concurrency=self.concurrency,
                     backoff_base_s=self.backoff_base_s, backoff_max_s=self.backoff_max_s, on_answer=on_answer)
        return [verdicts.get(k) for k in keys]

    def __call__(self, instruction: str, answer_a: str, answer_b: str) -> str | None:
        return self.judge_many([(instruction, answer_a, answer_b)])[0]


def _judge_all(judge, triples):
    if hasattr(judge, "judge_many"):
        return [_normalise_verdict(v) for v in judge.judge_many(triples)]
    return [_normalise_verdict(judge(*t)) for t in triples]


def length_controlled_win_rate(prefs: list[float], len_diffs: list[float]) -> tuple[float, str]:
    """sigmoid(t0) of p = sigmoid(t0 + t1 * tanh(d / sd(d))) fitted by weighted logistic regression."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    prefs, d = np.asarray(prefs, float), np.asarray(len_diffs, float)
    raw = float(prefs.mean())
    sd = float(d.std())
    if sd == 0 or prefs.min() == prefs.max() and prefs.min() in (0.0, 1.0):
        return raw, "raw (no length spread or one outcome class)"
    x = np.tanh(d / sd).reshape(-1, 1)
    xs, ys, ws = np.vstack([x, x]), np.r_[np.ones(len(x)), np.zeros(len(x))], np.r_[prefs, 1 - prefs]
    keep = ws > 0
    if len(set(ys[keep])) < 2:
        return raw, "raw (one outcome class)"
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(xs[keep], ys[keep], sample_weight=ws[keep])
    return float(1 / (1 + math.exp(-fit.intercept_[0]))), "logistic regression on tanh(length difference / sd)"


def pairwise_win_rate(instructions: list[str], answers_a: list[str], answers_b: list[str], judge,
                      both_orders: bool = True) -> dict:
    """Model A's win rate against model B (ties half), position-debiased, plus the LC win rate."""
    if not len(instructions) == len(answers_a) == len(answers_b):
        raise ValueError("instructions, answers_a and answers_b must have the same length")
    n = len(instructions)
    first = _judge_all(judge, list(zip(instructions, answers_a, answers_b)))
    second = _judge_all(judge, list(zip(instructions, answers_b, answers_a))) if both_orders else [None] * n
    value = {"A": 1.0, "tie": 0.5, "B": 0.0}
    records, prefs, diffs = [], [], []
    first_position = []  # 1 when the judge picked whichever answer was shown first
    for i in range(n):
        votes = []
        if first[i] is not None:
            votes.append(value[first[i]])
            first_position += [1.0] if first[i] == "A" else [0.0] if first[i] == "B" else []
        if second[i] is not None:
            votes.append(1.0 - value[second[i]])  # in the swapped order, "B" is model A
            first_position += [1.0] if second[i] == "A" else [0.0] if second[i] == "B" else []
        pref = sum(votes) / len(votes) if votes else None
        len_a, len_b = len(answers_a[i].split()), len(answers_b[i].split())
        records.append({"index": i, "verdict_ab": first[i], "verdict_ba": second[i], "preference_a": pref,
                        "words_a": len_a, "words_b": len_b})
        if pref is not None:
            prefs.append(pref)
            diffs.append(len_a - len_b)
    valid = len(prefs)
    both = [r for r in records if r["verdict_ab"] is not None and r["verdict_ba"] is not None]
    consistent = sum(value[r["verdict_ab"]] == 1.0 - value[r["verdict_ba"]] for r in both)
    result = {
        "n_instructions": n,
        "n_valid": valid,
        "n_invalid": n - valid,
        "both_orders": both_orders,
        "wins": sum(p > 0.5 for p in prefs),
        "losses": sum(p < 0.5 for p in prefs),
        "ties": sum(p == 0.5 for p in prefs),
        "win_rate": sum(prefs) / valid if valid else None,
        "position_consistency": consistent / len(both) if both else None,
        "first_position_rate": sum(first_position) / len(first_position) if first_position else None,
        "records": records,
    }
    if valid:
        result["lc_win_rate"], result["lc_method"] = length_controlled_win_rate(prefs, diffs)
    else:
        result["lc_win_rate"], result["lc_method"] = None, "no valid verdicts"
    return result


def export_alpaca_eval(path, instructions: list[str], outputs: list[str], generator: str,
                       dataset: str | list[str] | None = None, ids: list[str] | None = None) -> int:
    """Write answers in alpaca_eval's model_outputs.json format: [{instruction, output, generator}], with each
    row's dataset (one name for all, or one per row) and, beside alpaca_eval's fields, its sample id."""
    if len(instructions) != len(outputs) or (ids is not None and len(ids) != len(outputs)):
        raise ValueError("instructions, outputs (and ids) must have the same length")
    datasets = dataset if isinstance(dataset, list) else [dataset] * len(outputs)
    rows = [{"instruction": i, "output": o, "generator": generator, **({"dataset": d} if d else {})}
            for i, o, d in zip(instructions, outputs, datasets)]
    for row, sample_id in zip(rows, ids or []):
        row["id"] = sample_id
    write_json(path, rows)
    return len(rows)
