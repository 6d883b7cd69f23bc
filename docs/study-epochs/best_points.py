"""The multi-epoch study's checkpoint comparison (docs/study-epochs.md).

The study's verdict compares the final models (after 10 epochs). This script evaluates two more points of
each training seed, kept by `train.keep_points`, exactly as the final models were evaluated (`ual eval RUN
--adapter POINT`: held-out NLL and calibration, the benchmarks, feature clustering):

- each mode at its own best point by held-out NLL: early stopping, a selection on the held-out data;
- every mode at SFT's best step: the same training budget, chosen by SFT's held-out NLL alone.

It then compares them with the package's own paired statistics: A - B with a 95% paired-bootstrap interval
over items (seeds pooled) and the mean of the per-seed differences with a 95% t interval across seeds.

    python docs/study-epochs/best_points.py STUDY_RUN_DIR OUT_DIR [--modes sft,ls,ual]

Resumable: `ual eval` skips what it has evaluated. Writes OUT_DIR/best_points.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ual.cli import main as ual
from ual.config import load_config
from ual.evaluation.compare import ModelItems, compare, silhouette_difference
from ual.evaluation.stats import across_seeds
from ual.io import write_json, write_text
from ual.report.training_curves import best_point, read_curve
from ual.report.verdict import interval_text
from ual.runfolder import RunFolder

METRICS = ("nll/all", "nll/gsm8k", "nll/sharegpt", "ece/all", "ece/gsm8k", "ece/sharegpt")


def points(seed_dir: Path, modes: list[str]) -> dict[str, dict[str, str]]:
    """{'own best': {mode: point name}, 'at SFT's best step': {mode: point name}} for one seed."""
    best = {m: best_point(read_curve(seed_dir / "train" / m / "curve.jsonl"))["step"] for m in modes}
    return {"own best": {m: f"{m}-step{best[m]}" for m in modes},
            "at SFT's best step": {m: f"{m}-step{best['sft']}" for m in modes}}


def evaluate(seed_dir: Path, names: set[str]) -> None:
    for name in sorted(names):
        mode = name.rsplit("-step", 1)[0]
        if ual(["eval", str(seed_dir), "--adapter", str(seed_dir / "train" / mode / "points" / name)]) != 0:
            sys.exit(f"ual eval {seed_dir} --adapter {name} failed")


def differences(runs: list[RunFolder], a: str, b: str, cfg) -> dict:
    kw = {"n_bins": cfg.eval.ece_bins, "n_boot": cfg.eval.bootstrap, "seed": cfg.seed}
    rows = compare(ModelItems(runs, a), ModelItems(runs, b), u=None, **kw)
    sil = silhouette_difference(runs, a, b, cfg.eval.bootstrap, cfg.seed)
    if sil is not None:
        rows["clustering/silhouette"] = sil
    return rows


def table(root: Path, modes: list[str]) -> dict:
    cfg = load_config(root / "config.yaml")
    seed_dirs = sorted((root / "seeds").glob("seed-*"), key=lambda p: int(p.name.split("-")[1]))
    chosen = {p.name: points(p, modes) for p in seed_dirs}
    for p in seed_dirs:
        evaluate(p, {n for by_mode in chosen[p.name].values() for n in by_mode.values()})
    runs = [RunFolder(p) for p in seed_dirs]
    out = {"study": str(root), "seeds": [p.name for p in seed_dirs], "points": chosen, "comparisons": {}}
    pairs = [("ual", "sft"), ("ual", "ls"), ("ls", "sft")]
    for label in ("own best", "at SFT's best step"):
        for a, b in pairs:
            names = {(c[label][a], c[label][b]) for c in chosen.values()}
            pooled = differences(runs, *names.pop(), cfg) if len(names) == 1 else {}  # same point in every seed
            per_seed = [differences([r], chosen[r.root.name][label][a], chosen[r.root.name][label][b], cfg)
                        for r in runs]
            rows = {}
            for metric in sorted(set().union(*per_seed)):
                estimates = [d[metric]["estimate"] for d in per_seed if metric in d]
                rows[metric] = {"pooled_items": pooled.get(metric), "across_seeds": across_seeds(estimates).to_dict(),
                                "per_seed": estimates, "better": per_seed[0][metric]["better"]}
            out["comparisons"][f"{label}: {a} - {b}"] = rows
    return out


def render(t: dict) -> str:
    lines = ["# Checkpoints of the multi-epoch study", "",
             f"Study folder `{t['study']}`, seeds {', '.join(t['seeds'])}. Points evaluated per seed:", ""]
    for seed, by_label in t["points"].items():
        lines.append(f"- {seed}: " + "; ".join(f"{label}: {', '.join(by_mode.values())}"
                                                for label, by_mode in by_label.items()))
    lines += ["", "A - B: pooled over seeds with a 95% paired-bootstrap interval over items, and the mean of the "
              "per-seed differences with a 95% t interval across seeds; * = the interval excludes zero. "
              "'own best' is a selection on the held-out data (each mode stopped where its held-out NLL was "
              "lowest), so its held-out NLL rows are optimistic; the benchmark and clustering rows are not "
              "selected on.", "",
              "| points: A - B | metric | better | A - B, items | A - B, across seeds | per seed |",
              "|---|---|---|---:|---:|---|"]
    for pair, rows in t["comparisons"].items():
        keep = [m for m in rows if m in METRICS or "/" in m and m.split("/")[0] not in ("nll", "ece")]
        for metric in keep:
            r = rows[metric]
            lines.append(f"| {pair} | {metric} | {r['better']} | {interval_text(r['pooled_items'])} | "
                         f"{interval_text(r['across_seeds'])} | {', '.join(f'{x:+.4f}' for x in r['per_seed'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--modes", default="sft,ls,ual")
    args = parser.parse_args()
    result = table(args.study, args.modes.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "best_points.json", result)
    write_text(args.out / "best_points.md", render(result))
    print(args.out / "best_points.md")
