"""`ual ablate`'s components: modes and sweeps parsed, sub-run folders, the comparison tables.
The recipes that run the stages (run_ablation, run_seeds) are in ual/pipeline.py.

The paper's ablation (Table 4) in one command:

    ual ablate CONFIG                          sft, ls, ual and ppl on one run folder
    ual ablate CONFIG --eval                   ... and evaluate base + each mode
    ual ablate CONFIG --sweep 0.1,0.2,0.3,0.4,0.5 --eval
    ual ablate CONFIG --modes sft,ls,ual --seeds 3 --eval    each mode with 3 training seeds

Every mode is trained by the same `train_one` with the same seed (same LoRA init),
the same data order and the same number of optimiser steps; they differ only in
each sample's eps and each token's scale (stage.py: dft, eaft, ual+dft, ual+eaft). Missing earlier stages (data, score) run first and
are reused after; `map` is rerun for each target mean (it is cheap).

With --sweep, each target mean gets its own sub-run folder RUN/sweep/mean-M/ (its
own smoothing.jsonl, train/{ls,ual,ppl}, eval/), sharing RUN's samples and scores.
SFT (and dft, eaft: eps 0 too) does not depend on the mean, so it is trained (and evaluated) once, in RUN.
With --seeds N, each training seed K (seed, seed + 1, ...: LoRA init and data order)
gets its own sub-run folder RUN/seeds/seed-K/ sharing RUN's samples, scores and
smoothing; the base model is evaluated once, in RUN, and shared. Each seed folder has
its own comparisons.json; RUN/comparisons.json pools the seeds per held-out item, and
RUN/seeds.json (seeds.md) gives every metric and every paired difference as the mean
over seeds with a t interval across seeds. Finished seeds and modes are skipped on rerun.
The comparison is RUN/ablation.md and RUN/ablation.json.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ual.config import ExperimentConfig
from ual.io import read_json
from ual.training.plan import MODES as ALL_MODES
from ual.training.plan import mode_parts

log = logging.getLogger(__name__)

DEFAULT_MODES = ("sft", "ls", "ual", "ppl")
SHARED_FILES = ("samples.jsonl", "heldout.jsonl", "data_stats.json", "scores.jsonl", "heldout_scores.jsonl")
# A seed changes only training: the map's output is shared too.
SEED_SHARED_FILES = SHARED_FILES + ("smoothing.jsonl", "smoothing_stats.json")


def add_arguments(p) -> None:
    from ual.config_flags import add_config_flags

    p.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML experiment config (same as --config)")
    add_config_flags(p)
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated modes from {','.join(ALL_MODES)} (default: {','.join(DEFAULT_MODES)})")
    p.add_argument("--sweep", default=None, help="comma-separated target means, e.g. 0.1,0.2,0.3,0.4,0.5; "
                   "each in its own sub-run folder")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="train every mode with N seeds (seed, seed + 1, "
                   "...), each in RUN/seeds/seed-K/; metrics and differences as mean and interval across seeds")
    p.add_argument("--eval", action="store_true", help="evaluate the base model and every trained mode (ual eval)")
    p.add_argument("--force", action="store_true", help="retrain and re-evaluate what already exists")


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


def share_inputs(root: Path, sub: Path, names=SHARED_FILES) -> None:
    """Copy the shared data and scores into a sub-run (they are its inputs; a stale copy is replaced,
    one the root no longer has is removed, so a sub-run never mixes inputs of two versions), compared
    and copied a block at a time (a million samples are a GB). The tokenized sets are not copied: the
    sub-run's tokenized/ is a link to the root's, so every seed and target mean reads the sets the root
    built (ual.data.tokenized: a set is reused only while its own record matches)."""
    import os
    import shutil

    from ual.io import atomic_path
    from ual.lineage import file_digest

    sub.mkdir(parents=True, exist_ok=True)
    for name in names:
        src, dst = root / name, sub / name
        if src.exists() and (not dst.exists() or dst.stat().st_size != src.stat().st_size
                             or file_digest(dst) != file_digest(src)):
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
        elif not src.exists() and dst.exists():
            dst.unlink()
    tokenized = sub / "tokenized"
    if not tokenized.exists() and not tokenized.is_symlink():
        (root / "tokenized").mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(root / "tokenized", sub), tokenized)


# --------------------------------------------------------------------------- seeds

def seed_run_dir(root: Path, seed: int) -> Path:
    return root / "seeds" / f"seed-{seed}"


def share_base_eval(root: Path, sub: Path) -> None:
    """The base model does not depend on the training seed: its evaluation, made once in RUN, is copied."""
    from ual.runfolder import RunFolder

    src, dst = RunFolder(root), RunFolder(sub)
    files = [(src.eval_file("base"), dst.eval_file("base")), (src.tokens_file("base"), dst.tokens_file("base")),
             (src.features_file("base"), dst.features_file("base"))]
    files += [(src.items_file("base", k), dst.items_file("base", k)) for k in ("nll", "mc", "maths")]
    for a, b in files:
        if a.exists():
            b.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(a, b)


def across_seed_table(cfg: ExperimentConfig, modes: list[str], subs, pooled: dict) -> dict:
    """Per mode and metric: mean over seeds with a t interval; per pair and metric: the per-seed
    differences' mean with a t interval beside the item-bootstrap interval of the pooled seeds."""
    from ual.evaluation.compare import model_metric
    from ual.evaluation.stats import across_seeds

    per_seed = [read_json(s.run_path / "comparisons.json") if (s.run_path / "comparisons.json").exists() else {}
                for s in subs]
    metrics: dict[str, dict] = {}
    names = sorted({m for p in pooled["pairs"].values() for m in p if m != "pairwise"})
    for mode in ["base"] + modes:
        evals = [read_json(s.run_path / "eval" / f"{mode}.json") for s in subs
                 if (s.run_path / "eval" / f"{mode}.json").exists()]
        metrics[mode] = {}
        for name in names:
            values = [v for v in (model_metric(e, name) for e in evals) if v is not None]
            if values:
                metrics[mode][name] = across_seeds(values).to_dict() | {"values": values}
    pairs: dict[str, dict] = {}
    for pair, rows in pooled["pairs"].items():
        pairs[pair] = {}
        for name, row in rows.items():
            estimates = [p.get("pairs", {}).get(pair, {}).get(name, {}).get("estimate") for p in per_seed]
            estimates = [e for e in estimates if e is not None]
            pairs[pair][name] = {"pooled_items": row, "across_seeds": across_seeds(estimates).to_dict(),
                                 "per_seed": estimates, "better": row["better"]}
    return {"name": cfg.name, "model": cfg.model, "modes": modes, "seeds": [s.seed for s in subs],
            "metrics": metrics, "pairs": pairs, "settings": pooled["settings"]}


def render_seeds(table: dict) -> str:
    from ual.report.verdict import interval_text

    seeds = table["seeds"]
    lines = [f"# Seeds of `{table['name']}`", "",
             f"Model `{table['model']}`; modes {', '.join(table['modes'])}; training seeds {', '.join(map(str, seeds))} "
             "(LoRA init and data order; the same data, scores and smoothing).", "",
             "## Metrics: mean over seeds [95% t interval across seeds]", ""]
    names = sorted({n for m in table["metrics"].values() for n in m})
    lines += ["| metric | " + " | ".join(table["metrics"]) + " |", "|---|" + "---:|" * len(table["metrics"])]
    for name in names:
        cells = []
        for mode, m in table["metrics"].items():
            r = m.get(name)
            cells.append("" if r is None else (f"{r['estimate']:.4f}" if r["low"] is None else
                                               f"{r['estimate']:.4f} [{r['low']:.4f}, {r['high']:.4f}]"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired differences", "",
              "Per metric: A - B pooled over seeds with a 95% paired-bootstrap interval over held-out items, and the "
              "mean of the per-seed differences with a 95% t interval across seeds. * = the interval excludes zero.", "",
              "| pair | metric | better | A - B, items | A - B, across seeds | per seed |", "|---|---|---|---:|---:|---|"]
    for pair, rows in table["pairs"].items():
        for name, r in rows.items():
            per = ", ".join(f"{x:+.4f}" for x in r["per_seed"])
            lines.append(f"| {pair.replace(':', ' − ')} | {name} | {r['better']} | {interval_text(r['pooled_items'])} | "
                         f"{interval_text(r['across_seeds'])} | {per} |")
    return "\n".join(lines) + "\n"





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
        shared = [m for m in modes if mode_parts(m)[0] == "sft"]  # trained once, in RUN
        for m in shared:
            row(None, m, root)
        for mean in sweep:
            for m in modes:
                if m not in shared:
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
