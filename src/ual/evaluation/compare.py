"""Paired comparisons of two models on the same held-out items, with bootstrap intervals.

Every metric is recomputed from the per-item results `ual eval` keeps (eval/items/),
so A - B is evaluated on one set of resampled items for both models (stats.py says
why that matters). Metrics, each with its direction (lower or higher is better):

  nll/SOURCE, nll/all           token-weighted held-out NLL (ratio of sums over items)
  ece/SOURCE, ece/all           ECE of next-token predictions (equal-mass bins; items resampled)
  nll/u-qK, ece/u-qK            the same per quantile bucket of the held-out samples' uncertainty u
  mc/p_gold, mc/accuracy, mc/ece  multiple choice: probability of the right answer among the
                                choices, accuracy, calibration of the answer probabilities
  gsm8k/accuracy                final-answer exact match
  TASK/acc, TASK/acc_norm,      benchmarks scored as continuations (benchmarks.py): accuracy, length-
  TASK/p_gold, TASK/margin,     normalised accuracy, probability of the right choice(s), log-likelihood
  TASK/brier, TASK/ece          margin of the best right over the best wrong choice, Brier score, ECE
  clustering/silhouette         feature-clustering silhouette (paper §4), paired by token pair
  pairwise                      the judge's preference for A (0..1 per prompt) minus 0.5

Several run folders (training seeds of the same experiment, same held-out items) pool
per item: an item's NLL sums over seeds, its accuracy averages over seeds, its tokens
are all resampled together, so the interval reflects item variation around the
seed-averaged models. `across_seeds` (stats.py) gives the seed-to-seed interval beside it.
"""

from __future__ import annotations

import logging

import numpy as np

from ual.evaluation import stats
from ual.io import read_json, read_jsonl
from ual.runfolder import RunFolder, read_scores

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("nll", "ece", "brier")
BENCHMARK_MEASURES = ("acc", "acc_norm", "p_gold", "margin", "brier")


class ModelItems:
    """One model's per-item results in one or more run folders (seeds), aligned by item."""

    def __init__(self, runs: list[RunFolder], model: str):
        self.model = model
        self.nll = self.tokens = self.mc = self.maths = None
        self.tasks: dict[str, dict[str, np.ndarray]] = {}  # benchmark -> measure -> (seeds, items)
        nll_files = [r.items_file(model, "nll") for r in runs]
        if all(p.exists() for p in nll_files):
            rows = [read_jsonl(p) for p in nll_files]
            _same_items(rows, nll_files)
            self.ids = [r["id"] for r in rows[0]]
            self.sources = np.array([r["source"] for r in rows[0]])
            self.nll = np.array([[r["nll"] for r in rs] for rs in rows])  # (seeds, items)
            self.count = np.array([[r["tokens"] for r in rs] for rs in rows])
            self.tokens = []
            for r in runs:
                with np.load(r.tokens_file(model)) as z:
                    self.tokens.append((z["confidence"].astype(np.float64), z["correct"], z["item"]))
        mc_files = [r.items_file(model, "mc") for r in runs]
        if all(p.exists() for p in mc_files):
            rows = [read_jsonl(p) for p in mc_files]
            _same_items(rows, mc_files)
            self.mc = {k: np.array([[float(r[k]) for r in rs] for rs in rows]) for k in ("correct", "p_gold", "confidence")}
        maths_files = [r.items_file(model, "maths") for r in runs]
        if all(p.exists() for p in maths_files):
            rows = [read_jsonl(p) for p in maths_files]
            _same_items(rows, maths_files)
            self.maths = np.array([[float(r["correct"]) for r in rs] for rs in rows])
        prefix = f"{model}.task-"
        for path in sorted(runs[0].items_dir.glob(f"{prefix}*.jsonl")):
            task = path.name[len(prefix):-len(".jsonl")]
            files = [r.items_file(model, f"task-{task}") for r in runs]
            if not all(p.exists() for p in files):
                continue
            rows = [read_jsonl(p) for p in files]
            _same_items(rows, files)
            self.tasks[task] = {k: np.array([[np.nan if r.get(k) is None else float(r[k]) for r in rs] for rs in rows])
                                for k in BENCHMARK_MEASURES + ("confidence", "correct")}
            self.tasks[task]["ids"] = [r["id"] for r in rows[0]]


def _same_items(rows: list[list[dict]], files) -> None:
    ids = [[r["id"] for r in rs] for rs in rows]
    for other, path in zip(ids[1:], files[1:]):
        if other != ids[0]:
            raise ValueError(f"{path}: not the same items, in the same order, as {files[0]}; re-run `ual eval`")


def compare(a: ModelItems, b: ModelItems, *, u: dict[str, float] | None = None, n_buckets: int = 4,
            n_bins: int = 15, n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """metric -> Interval.to_dict() of A - B (plus "better": which direction is better), for every metric
    both models have. u: held-out id -> uncertainty, for the per-bucket rows."""
    kw = {"n_boot": n_boot, "seed": seed}
    out: dict[str, dict] = {}
    if a.nll is not None and b.nll is not None:
        if a.ids != b.ids:
            raise ValueError(f"{a.model} and {b.model} were evaluated on different held-out samples")
        groups = {f"nll/{s}": a.sources == s for s in sorted(set(a.sources))} | {"nll/all": np.ones(len(a.ids), bool)}
        if u:
            known = np.array([i in u for i in a.ids])
            if known.all():
                bucket, edges = stats.quantile_buckets(np.array([u[i] for i in a.ids]), n_buckets)
                for k in range(n_buckets):
                    groups[f"nll/u-q{k + 1}"] = bucket == k
        for name, sel in groups.items():
            if not sel.any():
                continue
            num_a, den_a = a.nll.sum(0)[sel], a.count.sum(0)[sel]
            num_b, den_b = b.nll.sum(0)[sel], b.count.sum(0)[sel]
            out[name] = stats.paired_ratio_difference(num_a, den_a, num_b, den_b, **kw).to_dict()
            out["ece/" + name.split("/", 1)[1]] = _token_ece_difference(a, b, np.flatnonzero(sel), n_bins, kw)
    if a.mc is not None and b.mc is not None:
        out["mc/p_gold"] = stats.paired_mean_difference(a.mc["p_gold"].mean(0), b.mc["p_gold"].mean(0), **kw).to_dict()
        out["mc/accuracy"] = stats.paired_mean_difference(a.mc["correct"].mean(0), b.mc["correct"].mean(0), **kw).to_dict()
        n_q = a.mc["correct"].shape[1]
        item = np.tile(np.arange(n_q), a.mc["correct"].shape[0])
        out["mc/ece"] = stats.grouped_ece_difference(
            a.mc["confidence"].ravel(), a.mc["correct"].ravel(), b.mc["confidence"].ravel(), b.mc["correct"].ravel(),
            item, n_q, n_bins=n_bins, **kw).to_dict()
    if a.maths is not None and b.maths is not None:
        out["gsm8k/accuracy"] = stats.paired_mean_difference(a.maths.mean(0), b.maths.mean(0), **kw).to_dict()
    for task in [t for t in a.tasks if t in b.tasks]:
        if a.tasks[task]["ids"] != b.tasks[task]["ids"]:
            log.warning("%s: %s and %s were evaluated on different items (other limits?): not compared; "
                        "`ual eval --force` with the same tasks evaluates both on the same ones", task, a.model, b.model)
            continue
        out.update(_benchmark_differences(task, a.tasks[task], b.tasks[task], n_bins, kw))
    for name, row in out.items():
        row["better"] = better_direction(name)
    return out


def _benchmark_differences(task: str, a: dict, b: dict, n_bins: int, kw) -> dict[str, dict]:
    """TASK/measure: A - B of each per-item measure's mean, and of the ECE over the choices, seeds pooled."""
    out = {}
    for key in BENCHMARK_MEASURES:
        va, vb = a[key].mean(0), b[key].mean(0)
        if np.isfinite(va).all() and np.isfinite(vb).all():
            out[f"{task}/{key}"] = stats.paired_mean_difference(va, vb, **kw).to_dict()
    n_items = a["correct"].shape[1]
    item = np.tile(np.arange(n_items), a["correct"].shape[0])
    out[f"{task}/ece"] = stats.grouped_ece_difference(
        a["confidence"].ravel(), a["correct"].ravel(), b["confidence"].ravel(), b["correct"].ravel(),
        item, n_items, n_bins=n_bins, **kw).to_dict()
    return out


def better_direction(metric: str) -> str:
    """'lower' for losses and calibration errors (nll/..., ece/..., mc/ece), else 'higher'."""
    group, _, key = metric.partition("/")
    return "lower" if group in LOWER_IS_BETTER or key in LOWER_IS_BETTER else "higher"


def _token_ece_difference(a: ModelItems, b: ModelItems, items: np.ndarray, n_bins: int, kw) -> dict:
    """ECE(A) - ECE(B) on the tokens of `items` (renumbered 0..n-1), all seeds pooled."""
    renumber = np.full(len(a.ids), -1)
    renumber[items] = np.arange(items.size)
    parts = []
    for (ca, ya, ia), (cb, yb, ib) in zip(a.tokens, b.tokens):  # the same run folders, in the same order
        if not np.array_equal(ia, ib):
            raise ValueError(f"{a.model} and {b.model}: token files of different held-out texts")
        keep = renumber[ia] >= 0
        parts.append((ca[keep], ya[keep], cb[keep], yb[keep], renumber[ia[keep]]))
    ca, ya, cb, yb, item = (np.concatenate(x) for x in zip(*parts))
    return stats.grouped_ece_difference(ca, ya, cb, yb, item, items.size, n_bins=n_bins, **kw).to_dict()


def pairwise_preference(run: RunFolder, a: str, b: str, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """The judge's mean preference for A over B minus 0.5, with a bootstrap interval over prompts."""
    path = run.items_file(f"pairwise.{a}_vs_{b}", "prompts")
    if not path.exists():
        return None
    prefs = np.array([r["preference_a"] for r in read_jsonl(path) if r.get("preference_a") is not None])
    row = stats.paired_mean_difference(prefs, np.full(prefs.size, 0.5), n_boot=n_boot, seed=seed).to_dict()
    return row | {"better": "higher"}


def silhouette_difference(runs: list[RunFolder], a: str, b: str, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """Feature clustering (paper §4): A - B of the mean silhouette over all token pairs, paired by token
    pair (the same pairs of the same held-out texts for every model), seeds averaged per pair."""
    per_run = []
    for r in runs:
        path = r.root / "clustering.json"
        if not path.exists():
            return None
        c = read_json(path)
        if a not in c.get("pairs", {}) or b not in c.get("pairs", {}):
            return None
        per_run.append((c["pair_ids"], c["pairs"][a], c["pairs"][b]))
    if any(ids != per_run[0][0] for ids, _, _ in per_run):
        return None  # different token pairs per seed: no pairing
    sa = np.mean([x for _, x, _ in per_run], axis=0)
    sb = np.mean([y for _, _, y in per_run], axis=0)
    return stats.paired_mean_difference(sa, sb, n_boot=n_boot, seed=seed).to_dict() | {"better": "higher"}


def heldout_u(run: RunFolder) -> tuple[dict[str, float] | None, str | None]:
    """(held-out id -> u, scorer) from heldout_scores.jsonl, when it comes from the scorer of scores.jsonl."""
    if not (run.heldout_scores.exists() and run.scores.exists()):
        return None, None
    held = read_scores(run.heldout_scores)
    scorers = {r.get("scorer") for scores in (held, read_scores(run.scores)) for r in scores.row.values()}
    if len(scorers) != 1 or None in scorers:
        return None, None
    return {i: x for i, x in held.score.items() if x is not None}, scorers.pop()


def run_comparisons(cfg, runs: list[RunFolder] | None = None) -> dict:
    """comparisons.json of a run folder: every eval.compare pair whose models were evaluated."""
    from ual.config import split_pair
    from ual.io import write_json

    root = RunFolder(cfg.run_path)
    runs = runs or [root]
    ec = cfg.eval
    u, u_scorer = heldout_u(root)
    out = {"settings": {"bootstrap": ec.bootstrap, "level": 0.95, "ece_bins": ec.ece_bins, "u_buckets": ec.u_buckets,
                        "runs": [str(r.root) for r in runs], "u_scorer": u_scorer if u else None},
           "pairs": {}}
    for pair in ec.compare:
        a, b = split_pair(pair)
        if not all(r.items_file(m, "nll").exists() or r.items_file(m, "mc").exists()
                   or any(r.items_dir.glob(f"{m}.task-*.jsonl")) for r in runs for m in (a, b)):
            continue
        rows = compare(ModelItems(runs, a), ModelItems(runs, b), u=u, n_buckets=ec.u_buckets, n_bins=ec.ece_bins,
                       n_boot=ec.bootstrap, seed=cfg.seed)
        sil = silhouette_difference(runs, a, b, ec.bootstrap, cfg.seed)
        if sil is not None:
            rows["clustering/silhouette"] = sil
        if len(runs) == 1:
            pref = pairwise_preference(root, a, b, ec.bootstrap, cfg.seed)
            if pref is not None:
                rows["pairwise"] = pref
        out["pairs"][pair] = rows
    if u:
        out["buckets"] = bucket_table(runs, [m for m in _evaluated(runs, cfg)], u, ec.u_buckets, ec.ece_bins)
    write_json(root.comparisons, out)
    return out


def _evaluated(runs: list[RunFolder], cfg) -> list[str]:
    from ual.config import split_pair
    from ual.runfolder import model_key

    names = list(dict.fromkeys([model_key(m) for m in cfg.eval.models]
                               + [m for p in cfg.eval.compare for m in split_pair(p)]))
    return [m for m in names if all(r.items_file(m, "nll").exists() for r in runs)]


def bucket_table(runs: list[RunFolder], models: list[str], u: dict[str, float], n_buckets: int, n_bins: int) -> dict:
    """Each model's held-out NLL and token ECE per quantile bucket of u (seeds pooled)."""
    out = {"models": {}}
    for m in models:
        items = ModelItems(runs, m)
        if not all(i in u for i in items.ids):
            return {}
        bucket, edges = stats.quantile_buckets(np.array([u[i] for i in items.ids]), n_buckets)
        out["edges"] = [float(e) for e in edges]
        rows = []
        for k in range(n_buckets):
            sel = bucket == k
            conf, correct = [], []
            for c, y, it in items.tokens:
                keep = sel[it]
                conf.append(c[keep])
                correct.append(y[keep])
            conf, correct = np.concatenate(conf), np.concatenate(correct)
            rows.append({"bucket": f"u-q{k + 1}", "items": int(sel.sum()),
                         "sources": {s: int(n) for s, n in zip(*np.unique(items.sources[sel], return_counts=True))},
                         "nll": float(items.nll.sum(0)[sel].sum() / max(items.count.sum(0)[sel].sum(), 1)),
                         "ece": stats.ece(conf, correct, n_bins) if conf.size else None})
        out["models"][m] = rows
    return out


def model_metric(ev: dict, metric: str) -> float | None:
    """A model's own value of a comparison metric, from its eval/MODEL.json (for tables)."""
    group, _, key = metric.partition("/")
    if group == "nll":
        return (ev.get("nll") or {}).get(key, {}).get("nll")
    if group == "ece":
        return (ev.get("calibration") or {}).get(key, {}).get("ece")
    if group == "mc":
        mc = ev.get("multiple_choice") or {}
        return mc.get(key)
    if group == "gsm8k":
        return (ev.get("maths") or {}).get("accuracy")
    return None


def read_comparisons(run: RunFolder) -> dict | None:
    return read_json(run.comparisons) if run.comparisons.exists() else None
