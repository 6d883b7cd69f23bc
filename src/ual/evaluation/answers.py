"""Held-out chat prompts answered by every model, once: the report's "Answers side by side" (the paper's
case study, its Figure 4) and the pairwise judge read the same answers.

Which prompts: `eval.answers_per_source` held-out samples of each source, drawn by SELECTION_RULE (a seed
of the source's name, over that source's held-out samples in heldout.jsonl order: never chosen by how
they read), then the pairwise comparison's prompts (the first `eval.pairwise_limit` of
`eval.pairwise_source`) when a judge runs. Each model answers all of them in one greedy
`generate_answers` call of at most `eval.pairwise_max_new_tokens` tokens, into eval/answers/MODEL.json
(alpaca_eval's model_outputs layout, each row with its sample's id and source); the chosen prompts
and what the answers cost are in eval/answers/side_by_side.json.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time

from ual.io import read_json, write_json

log = logging.getLogger(__name__)

SELECTION_SEED = "ual-answers-v1"  # never the training seed: the prompts must not change with it
SELECTION_RULE = ("per source, `random.Random(\"{seed}:SOURCE\").sample` of {n} of that source's held-out samples "
                  "(in heldout.jsonl order), shown in that order; drawn before any answer exists, never chosen by "
                  "how they read")


def side_by_side_samples(heldout, per_source: int) -> list:
    """`per_source` held-out samples of each source (all of a smaller one), by SELECTION_RULE."""
    by_source: dict[str, list] = {}
    for s in heldout:
        by_source.setdefault(s.source, []).append(s)
    chosen = []
    for source, samples in by_source.items():
        k = min(per_source, len(samples))
        chosen += [samples[i] for i in sorted(random.Random(f"{SELECTION_SEED}:{source}").sample(range(len(samples)), k))]
    return chosen


def answered_samples(side_by_side: list, pairwise: list) -> list:
    """Every sample a model the judge compares answers: the side-by-side ones, then the pairwise ones not among
    them (the other models answer the side-by-side ones only)."""
    seen = {s.id for s in side_by_side}
    return side_by_side + [s for s in pairwise if s.id not in seen]


def answers_settings(samples: list, max_new_tokens: int) -> dict:
    """What a model's answers depend on besides the model (its lineage record's settings)."""
    ids = hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()[:16]
    return {"prompts": ids, "n": len(samples), "max_new_tokens": max_new_tokens, "decoding": "greedy"}


def generate_and_save(model, tokenizer, samples: list, path, generator: str, max_new_tokens: int,
                      batch_size: int) -> float:
    """Answer every sample's prompt (greedy) and write them in alpaca_eval's layout; returns the seconds it took."""
    from ual.evaluation.generate import generate_answers
    from ual.evaluation.pairwise import export_alpaca_eval

    start = time.time()
    outputs = generate_answers(model, tokenizer, [s.prompt_messages for s in samples], max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    export_alpaca_eval(path, [s.prompt_messages[-1]["content"] for s in samples], outputs, generator,
                       dataset=[s.source for s in samples], ids=[s.id for s in samples])
    seconds = time.time() - start
    log.info("%s: %d held-out answers (at most %d new tokens each) in %.1f s", generator, len(samples),
             max_new_tokens, seconds)
    return seconds


def answers_for(path, ids: list[str]) -> list[dict]:
    """The rows of one model's answers file for these sample ids, in their order."""
    rows = {r.get("id"): r for r in read_json(path)}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise ValueError(f"{path}: no answer to held-out sample(s) {', '.join(missing[:3])}; rerun `ual eval --force`")
    return [rows[i] for i in ids]


def record_selection(path, samples: list, per_source: int, model: str | None = None, answered: int = 0,
                     seconds: float | None = None) -> None:
    """eval/answers/side_by_side.json: the chosen prompts, the rule, and per model how many prompts it answered
    (these and, for a model the judge compares, the pairwise ones) and in how many seconds."""
    old = read_json(path) if path.exists() else {}
    ids = [s.id for s in samples]
    cost = old.get("cost", {}) if old.get("ids") == ids else {}
    if model is not None:
        cost[model] = {"prompts": answered, "seconds": seconds}
    write_json(path, {"rule": SELECTION_RULE.format(seed=SELECTION_SEED, n=per_source), "per_source": per_source,
                      "ids": ids, "sources": [s.source for s in samples], "cost": cost})
