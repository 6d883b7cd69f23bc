"""Do the model-based scorers separate precise from open-ended data beyond the demo's two sources?

Builds, offline, one open-ended set and several precise ones, scores every sample with
two forward passes of the reference model (with the instructions, and with them blanked),
which give the four model-based measures (mean predictive entropy and mean NLL over the
response tokens, and each divided by its value with the instructions blanked), and prints, for each precise set against the open
set, the AUC of open over precise and the ratio of their mean eps after the map
(target mean 0.1) under each normalisation.

  open      ShareGPT, first exchange (packaged dump; holds some code, which is precise)
  creative  ShareGPT first exchanges whose request asks for writing (story, poem, essay, ...)
  gsm8k     GSM8K worked solutions (precise, multi-step)
  mmlu      the packaged MMLU-style questions answered "The answer is X. <choice>" (precise, short)
  arith     generated arithmetic "What is 37 * 48?" -> "37 * 48 = 1776." (precise, and
            hard for a small model: its NLL is high because it cannot multiply, not because
            many answers are good; the entropy is what should stay low)

    python benchmarks/separation.py [--n 64] [--model smollm2-135m] [--max-length 192]
Ends with one JSON line: {"OPEN_vs_PRECISE": {"entropy_auc", "entropy_rank_ratio", "nll_auc", ...}}.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ual.config import SmoothingConfig  # noqa: E402
from ual.sample import Sample  # noqa: E402

WRITING = re.compile(r"\b(write|story|poem|essay|letter|email|song|tweet|slogan|describe|blog)\b", re.I)


def build_sets(n: int, seed: int = 0) -> dict[str, list[Sample]]:
    from ual.data.sources import load_gsm8k, load_sharegpt
    from ual.evaluation.multiple_choice import LETTERS, load_packaged_mc

    rng = random.Random(seed)
    chat, _ = load_sharegpt(limit=6 * n)
    first = []
    for s in chat:
        user = next(m for m in s.messages if m["role"] == "user")
        reply = next(m for m in s.messages if m["role"] == "assistant")
        first.append(Sample.create("open", [user, reply]))
    creative = [Sample.create("creative", s.messages) for s in first if WRITING.search(s.messages[0]["content"])]
    gsm, _ = load_gsm8k()
    mc = load_packaged_mc(limit=n)
    mmlu = [Sample.create("mmlu", [
        {"role": "user", "content": q.question + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))},
        {"role": "assistant", "content": f"The answer is {LETTERS[q.answer]}. {q.choices[q.answer]}"}]) for q in mc]
    arith = []
    for _ in range(n):
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        op, val = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        arith.append(Sample.create("arith", [{"role": "user", "content": f"What is {a} {op} {b}?"},
                                             {"role": "assistant", "content": f"{a} {op} {b} = {val}."}]))
    return {"open": first[:n], "creative": creative[:n], "gsm8k": gsm[:n], "mmlu": mmlu, "arith": arith}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="samples per set")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-length", type=int, default=192)
    args = p.parse_args()

    from ual.token_stats import response_token_stats
    from ual.models import load_model, load_tokenizer
    from ual.scoring.analysis import separation
    from ual.scoring.perplexity import without_instructions

    sets = build_sets(args.n)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model, "cpu")
    start = time.time()
    scored = {}
    for name, samples in sets.items():
        st = response_token_stats(model, tokenizer, samples, args.max_length, batch_size=8, desc=name)
        alone = response_token_stats(model, tokenizer, [without_instructions(s) for s in samples], args.max_length,
                                     batch_size=8, desc=f"{name}, instructions blanked")
        scored[name] = [(x, {"entropy": x.mean_entropy, "nll": x.mean_nll,
                             "entropy_ratio": x.mean_entropy / a.mean_entropy, "nll_ratio": x.mean_nll / a.mean_nll})
                        for x, a in zip(st, alone) if x.tokens and a.tokens and a.mean_entropy > 0 and a.mean_nll > 0]
    seconds = time.time() - start
    smoothing = SmoothingConfig(target_mean=0.1)
    print(f"Model `{args.model}`, max_length {args.max_length}, {sum(len(v) for v in scored.values())} samples "
          f"scored in {seconds:.0f} s. Per set: mean entropy / mean NLL (nats per response token).\n")
    print("| set | n | mean entropy | mean NLL |\n|---|---:|---:|---:|")
    for name, rows in scored.items():
        ent = sum(m["entropy"] for _, m in rows) / len(rows)
        nll = sum(m["nll"] for _, m in rows) / len(rows)
        print(f"| {name} | {len(rows)} | {ent:.3f} | {nll:.3f} |")
    print("\nOpen (or creative) over each precise set: AUC, and mean eps ratio after the map at target mean 0.1 "
          "(normalisation max / minmax / rank), scores from the two sets alone.\n")
    print("| open set | precise set | measure | AUC | eps ratio max | minmax | rank |\n|---|---|---|---:|---:|---:|---:|")
    summary = {}
    for open_set in ("open", "creative"):
        for precise in ("gsm8k", "mmlu", "arith"):
            for measure in ("entropy_ratio", "entropy", "nll_ratio", "nll"):
                rows = [{"source": name, "score": m[measure]} for name in (open_set, precise)
                        for _, m in scored[name]]
                (pair,) = separation(rows, smoothing=smoothing)
                auc = pair["auc"] if pair["high"] == open_set else 1 - pair["auc"]
                ratios = {k: (v if pair["high"] == open_set else (1 / v if v else None))
                          for k, v in pair["eps_ratio"].items()}
                print(f"| {open_set} | {precise} | {measure} | {auc:.3f} | "
                      + " | ".join("" if ratios[k] is None else f"{ratios[k]:.2f}x" for k in ("max", "minmax", "rank"))
                      + " |")
                key = f"{open_set}_vs_{precise}"
                summary.setdefault(key, {})[f"{measure}_auc"] = round(auc, 3)
                summary[key][f"{measure}_rank_ratio"] = None if ratios["rank"] is None else round(ratios["rank"], 2)
    print()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
