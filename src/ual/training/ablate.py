"""`ual ablate`: the paper's ablation (Table 4) in one command.

    ual ablate CONFIG                          sft, ls, ual and ppl on one run folder
    ual ablate CONFIG --eval                   ... and evaluate base + each mode
    ual ablate CONFIG --sweep 0.1,0.2,0.3,0.4,0.5 --eval

Every mode is trained by the same `train_one` with the same seed (same LoRA init),
the same data order and the same number of optimiser steps; they differ only in
each sample's eps (stage.py). Missing earlier stages (data, score) run first and
are reused after; `map` is rerun for each target mean (it is cheap).

With --sweep, each target mean gets its own sub-run folder RUN/sweep/mean-M/ (its
own smoothing.jsonl, train/{ls,ual,ppl}, eval/), sharing RUN's samples and scores.
SFT does not depend on the mean, so it is trained (and evaluated) once, in RUN.
The comparison is RUN/ablation.md and RUN/ablation.json.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

from ual.config import ExperimentConfig
from ual.io import read_json, write_json, write_text

log = logging.getLogger(__name__)

ALL_MODES = ("sft", "ls", "ual", "ppl")
SHARED_FILES = ("samples.jsonl", "heldout.jsonl", "data_stats.json", "scores.jsonl")


def add_arguments(p) -> None:
    from ual.config import add_config_flags

    p.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML experiment config (same as --config)")
    add_config_flags(p)
    p.add_argument("--modes", default=",".join(ALL_MODES), help="comma-separated modes (default: sft,ls,ual,ppl)")
    p.add_argument("--sweep", default=None, help="comma-separated target means, e.g. 0.1,0.2,0.3,0.4,0.5; "
                   "each in its own sub-run folder")
    p.add_argument("--eval", action="store_true", help="evaluate the base model and every trained mode (ual eval)")
    p.add_argument("--force", action="store_true", help="retrain and re-evaluate what already exists")


def run(args) -> dict:
    from ual.config import config_from_args

    cfg = config_from_args(args)
    modes = parse_modes(args.modes)
    sweep = parse_sweep(args.sweep) if args.sweep else None
    return run_ablation(cfg, modes, sweep, evaluate=args.eval, force=args.force)


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad or not modes:
        raise ValueError(f"--modes: unknown mode(s) {bad}; choose from {', '.join(ALL_MODES)}")
    return modes


def parse_sweep(text: str) -> list[float]:
    try:
        means = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--sweep: expected comma-separated numbers, got {text!r}") from None
    if not means or any(not 0 < m < 1 for m in means) or len(set(means)) != len(means):
        raise ValueError(f"--sweep: target means must be distinct numbers in (0, 1), got {text!r}")
    return means


def sub_run_dir(root: Path, mean: float) -> Path:
    return root / "sweep" / f"mean-{mean:g}"


def run_ablation(cfg: ExperimentConfig, modes: list[str], sweep: list[float] | None = None,
                 evaluate: bool = False, force: bool = False) -> dict:
    from ual.cli import run_stage

    root = cfg.run_path
    prepare(cfg, need_scores="ual" in modes)
    if sweep is None:
        runs = [(cfg.smoothing.target_mean, cfg, modes)]
        shared_modes: list[str] = []
    else:
        shared_modes = [m for m in modes if m == "sft"]
        runs = []
        for mean in sweep:
            sub = copy.deepcopy(cfg)
            sub.run_dir = str(sub_run_dir(root, mean))
            sub.smoothing.target_mean = mean
            share_inputs(root, sub.run_path)
            runs.append((mean, sub, [m for m in modes if m != "sft"]))
        if shared_modes:
            train_modes(cfg, shared_modes, force)
            if evaluate:
                evaluate_models(cfg, ["base"] + shared_modes, force)
    for mean, sub, sub_modes in runs:
        log.info("ablate: target mean %g: %s", mean, ", ".join(sub_modes))
        if "ual" in sub_modes:
            run_stage("map", sub)
        train_modes(sub, sub_modes, force)
        if evaluate:
            evaluate_models(sub, ([] if shared_modes or sweep else ["base"]) + sub_modes, force)
    if evaluate and sweep is None:
        from ual.report.stage import run_report

        run_report(cfg)
    table = comparison(cfg, modes, sweep)
    write_json(root / "ablation.json", table)
    write_text(root / "ablation.md", render(table))
    return {"table": str(root / "ablation.md"), "json": str(root / "ablation.json"), "rows": len(table["rows"])}


def prepare(cfg: ExperimentConfig, need_scores: bool) -> None:
    """Run `data` (and `score`, for ual) unless their outputs exist: all modes share them."""
    from ual.cli import run_stage

    root = cfg.run_path
    if not (root / "samples.jsonl").exists():
        run_stage("data", cfg)
    if need_scores and not (root / "scores.jsonl").exists():
        run_stage("score", cfg)


def share_inputs(root: Path, sub: Path) -> None:
    """Copy the shared data and scores into a sub-run (they are its inputs; a stale copy is replaced)."""
    sub.mkdir(parents=True, exist_ok=True)
    for name in SHARED_FILES:
        src, dst = root / name, sub / name
        if src.exists() and (not dst.exists() or dst.read_bytes() != src.read_bytes()):
            shutil.copyfile(src, dst)


def train_modes(cfg: ExperimentConfig, modes: list[str], force: bool) -> dict:
    from ual.cli import run_stage

    c = copy.deepcopy(cfg)
    c.train.modes = list(modes)
    return run_stage("train", c, force=force)


def evaluate_models(cfg: ExperimentConfig, models: list[str], force: bool) -> dict:
    from ual.cli import run_stage
    from ual.evaluation.stage import split_pair

    c = copy.deepcopy(cfg)
    c.eval.models = list(models)
    # Pairwise comparisons need both models in this run folder (with a sweep, sft and base live in RUN).
    c.eval.pairwise = [p for p in c.eval.pairwise if all(m in models for m in split_pair(p))]
    return run_stage("eval", c, force=force)


# --------------------------------------------------------------------------- the table

def comparison(cfg: ExperimentConfig, modes: list[str], sweep: list[float] | None) -> dict:
    root = cfg.run_path
    rows = []

    def row(mean, mode, folder: Path):
        r = {"target_mean": mean, "mode": mode, "run": str(folder)}
        res = folder / "train" / mode / "result.json"
        if mode != "base" and res.exists():
            t = read_json(res)
            r.update(steps=t["steps"], samples=t["samples"], mean_eps=t["mean_eps"],
                     train_loss=t["train_loss"], final_loss=t["final_loss"], seconds=t["seconds"])
        ev = folder / "eval" / f"{mode}.json"
        if ev.exists():
            e = read_json(ev)
            r["nll"] = {k: v["nll"] for k, v in e.get("nll", {}).items()}
            if e.get("maths"):
                r["gsm8k_accuracy"] = e["maths"]["accuracy"]
                r["gsm8k_n"] = e["maths"]["n_questions"]
            if e.get("multiple_choice"):
                r["mc_accuracy"] = e["multiple_choice"].get("accuracy")
        clus = folder / "clustering.json"
        if clus.exists():
            sil = read_json(clus).get("models", {}).get(mode)
            if sil:
                r["silhouette"] = sil.get("mean_all_pairs")
        rows.append(r)

    if (root / "eval" / "base.json").exists():
        row(None, "base", root)
    if sweep is None:
        for m in modes:
            row(cfg.smoothing.target_mean, m, root)
    else:
        if "sft" in modes:
            row(None, "sft", root)
        for mean in sweep:
            for m in modes:
                if m != "sft":
                    row(mean, m, sub_run_dir(root, mean))
    steps = {r["steps"] for r in rows if "steps" in r}
    return {
        "name": cfg.name, "model": cfg.model, "seed": cfg.seed, "modes": modes, "sweep": sweep,
        "same_steps": len(steps) <= 1, "rows": rows,
        "note": "train losses include each mode's own smoothing term and are not comparable across modes; "
                "held-out NLL and accuracy are",
    }


def render(table: dict) -> str:
    rows = table["rows"]
    sources = sorted({k for r in rows for k in r.get("nll", {}) if k != "all"})
    extra = [(k, name) for k, name in (("mc_accuracy", "MC acc"), ("silhouette", "silhouette"))
             if any(k in r for r in rows)]
    head = (["target mean", "mode", "steps", "mean eps", "final train loss"] + [f"NLL {s}" for s in sources]
            + ["NLL all", "GSM8K acc"] + [name for _, name in extra])
    lines = [f"# Ablation `{table['name']}`", "",
             f"Model `{table['model']}`, seed {table['seed']}; modes {', '.join(table['modes'])}"
             + (f"; target-mean sweep {', '.join(f'{m:g}' for m in table['sweep'])}" if table["sweep"] else "") + ".",
             "Every mode: same seed, same data order, same number of optimiser steps"
             + ("" if table["same_steps"] else " (WARNING: the step counts differ)") + ".", "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]

    def f(x, nd=4):
        return "" if x is None else f"{x:.{nd}f}"

    for r in rows:
        nll = r.get("nll", {})
        cells = ["" if r["target_mean"] is None else f"{r['target_mean']:g}", r["mode"], str(r.get("steps", "")),
                 f(r.get("mean_eps")), f(r.get("final_loss"))]
        cells += [f(nll.get(s)) for s in sources] + [f(nll.get("all"))]
        acc = r.get("gsm8k_accuracy")
        cells.append("" if acc is None else f"{acc:.3f} (n={r['gsm8k_n']})")
        cells += [f(r.get(k), 3) for k, _ in extra]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Note: {table['note']}. SFT does not depend on the target mean: with a sweep it is trained once.", ""]
    return "\n".join(lines)
