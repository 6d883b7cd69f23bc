"""Scores report: what the scorer said, per data source, what failed and why, and how two scorers agree.

Reads the scores.jsonl rows `ual score` writes ({"id", "source", "score",
"scorer", "details"}). Produces:
- one histogram of u per data source (the paper's Appendix B shows that high-
  and low-entropy sets separate), plus all sources overlaid, as PNG;
- the failures, each with its reason, and a count per reason (a failure is
  never hidden behind a default score, so it must be visible here);
- the Spearman rank correlation between two scorers on the ids both scored
  (judge vs perplexity: ranks, because their scales are unrelated);
- separation: for every pair of sources, the AUC of their scores (the chance that a
  sample of one outscores a sample of the other) and the ratio of their mean eps after
  the map under each normalisation. UAL only differs from uniform smoothing where the
  sources it should treat differently get clearly different eps.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from pathlib import Path

from ual.io import write_json, write_jsonl
from ual.runfolder import read_scores


def load_scores(path: str | Path) -> list[dict]:
    """The rows of a score file, checked (runfolder.read_scores: one row per id)."""
    return list(read_scores(Path(path)).row.values())


def summarize(rows: list[dict]) -> dict:
    """Counts and moments per source and overall."""
    by_source = defaultdict(list)
    for r in rows:
        by_source[r.get("source", "?")].append(r)
    out = {"all": _stats(rows)}
    out.update({src: _stats(rs) for src, rs in sorted(by_source.items())})
    return out


def _stats(rows: list[dict]) -> dict:
    vals = sorted(r["score"] for r in rows if r.get("score") is not None)
    n = len(vals)
    if not n:
        return {"n": len(rows), "scored": 0, "failed": len(rows)}
    mean = sum(vals) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / n)
    return {"n": len(rows), "scored": n, "failed": len(rows) - n, "mean": mean, "std": sd,
            "min": vals[0], "median": vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2,
            "max": vals[-1]}


def failures(rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Failed rows (id, source, scorer, error) and how many per kind of reason."""
    failed = [{"id": r["id"], "source": r.get("source"), "scorer": r.get("scorer"),
               "error": (r.get("details") or {}).get("error", "no reason recorded")}
              for r in rows if r.get("score") is None]
    kinds = Counter(_reason_kind(f["error"]) for f in failed)
    return failed, dict(kinds.most_common())


def _reason_kind(error: str) -> str:
    """'unparseable answer: out of range: 150' -> 'unparseable answer: out of range'."""
    parts = [p.strip() for p in str(error).split(":")]
    kind = parts[0] if len(parts) < 3 else f"{parts[0]}: {parts[1]}"
    return re.sub(r"\d+", "N", kind)[:80]


def histograms(rows: list[dict], out_dir: str | Path, bins: int = 20) -> list[Path]:
    """hist_<source>.png per source and hist_all.png (sources overlaid); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_source = defaultdict(list)
    for r in rows:
        if r.get("score") is not None:
            by_source[r.get("source", "?")].append(r["score"])
    edges = [i / bins for i in range(bins + 1)]
    paths = []
    for src, vals in sorted(by_source.items()):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(vals, bins=edges, color="tab:blue", edgecolor="white")
        ax.set(title=f"{src}: n={len(vals)}, mean u={sum(vals) / len(vals):.3f}", xlabel="u = score / 99",
               ylabel="samples", xlim=(0, 1))
        fig.tight_layout()
        path = out_dir / f"hist_{re.sub(r'[^A-Za-z0-9_.-]+', '_', src)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    if by_source:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for src, vals in sorted(by_source.items()):
            ax.hist(vals, bins=edges, alpha=0.5, label=f"{src} (n={len(vals)})", density=True)
        ax.set(title="uncertainty per data source", xlabel="u = score / 99", ylabel="density", xlim=(0, 1))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "hist_all.png", dpi=100)
        plt.close(fig)
        paths.append(out_dir / "hist_all.png")
    return paths


def rank_correlation(a: str | Path | list[dict], b: str | Path | list[dict]) -> dict:
    """Spearman's rho between two scorers' scores on the ids both scored.

    Reports how many ids were shared and how many only one side had (or had
    failed), so a correlation over a small overlap is not mistaken for more.
    """
    from scipy.stats import spearmanr

    ra = {r["id"]: r for r in (load_scores(a) if isinstance(a, (str, Path)) else a)}
    rb = {r["id"]: r for r in (load_scores(b) if isinstance(b, (str, Path)) else b)}
    common = [i for i in ra if i in rb and ra[i].get("score") is not None and rb[i].get("score") is not None]
    out = {"scorer_a": _scorer_name(ra), "scorer_b": _scorer_name(rb), "n": len(common),
           "only_a": len(set(ra) - set(rb)), "only_b": len(set(rb) - set(ra)),
           "failed_either": sum(1 for i in set(ra) & set(rb) if i not in set(common)), "spearman": None}
    if len(common) < 3:
        out["note"] = "fewer than 3 ids scored by both"
        return out
    xa, xb = [ra[i]["score"] for i in common], [rb[i]["score"] for i in common]
    rho = spearmanr(xa, xb).statistic if len(set(xa)) > 1 and len(set(xb)) > 1 else float("nan")
    if not math.isfinite(float(rho)):
        out["note"] = "a constant score on one side: rank correlation undefined"
    else:
        out["spearman"] = float(rho)
    return out


def _scorer_name(rows: dict) -> str | None:
    names = {r.get("scorer") for r in rows.values()}
    return names.pop() if len(names) == 1 else ",".join(sorted(str(n) for n in names))


def comparison_plot(a: list[dict], b: list[dict], path: str | Path) -> Path | None:
    """Rank against rank of two scorers on the ids both scored, one colour per data source
    (ranks, as the Spearman correlation uses: the scorers' scales are unrelated). None: no overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import rankdata

    rb = {r["id"]: r for r in b if r.get("score") is not None}
    both = [(r, rb[r["id"]]) for r in a if r.get("score") is not None and r["id"] in rb]
    if not both:
        return None
    n = len(both)
    rank_a = rankdata([x["score"] for x, _ in both]) / n
    rank_b = rankdata([y["score"] for _, y in both]) / n
    by_source = defaultdict(list)
    for (x, _), ra, rbb in zip(both, rank_a, rank_b):
        by_source[x.get("source", "?")].append((ra, rbb))
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for src, pts in sorted(by_source.items()):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, alpha=0.6, label=f"{src} (n={len(pts)})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    name_a = _scorer_name({x["id"]: x for x, _ in both})
    ax.set(xlabel=f"rank / n under {name_a}", ylabel=f"rank / n under {_scorer_name(rb)}", xlim=(0, 1.02),
           ylim=(0, 1.02), title=f"two scorers, {n} samples")
    ax.xaxis.label.set_fontsize(7)
    ax.yaxis.label.set_fontsize(7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def separation(rows: list[dict], eps_key: str | None = None, smoothing=None) -> list[dict]:
    """How well the scores of `rows` ({"source", "score"}, failures excluded) separate each pair of sources.

    Per pair, ordered so that `high` is the source with the higher mean score: the AUC of
    high over low (Mann-Whitney: P(score_high > score_low), ties half), and the ratio of their
    mean eps: from rows[eps_key] (the map as applied), or, given `smoothing` (target_mean,
    eps_max), under each normalisation (smoothing.NORMALIZATIONS) with the pure map.
    """
    import numpy as np

    ok = [r for r in rows if r.get("score") is not None]
    eps = {"applied": np.array([r[eps_key] for r in ok], dtype=float)} if eps_key is not None else None
    return separation_arrays(np.array([r.get("source", "?") for r in ok], dtype=object),
                             np.array([r["score"] for r in ok], dtype=float), eps, smoothing)


def separation_arrays(source, scores, eps: dict | None = None, smoothing=None) -> list[dict]:
    """`separation` on columns: each scored sample's source and score (no failures), and its eps per method
    (`eps`: {"applied": array}) or, given `smoothing`, under each normalisation."""
    import numpy as np
    from scipy.stats import rankdata

    from ual.smoothing import NORMALIZATIONS, map_to_smoothing, normalize_scores

    eps = dict(eps or {})
    if not eps and smoothing is not None and len(scores):
        for method in NORMALIZATIONS:
            try:
                eps[method] = map_to_smoothing(normalize_scores(scores, method), smoothing.target_mean, smoothing.eps_max)
            except ValueError:  # constant scores under minmax/rank, an unreachable target: no ratio to show
                eps[method] = None
    sources = sorted(set(source.tolist()))
    index = {src: np.flatnonzero(source == src) for src in sources}
    out = []
    for i, a in enumerate(sources):
        for b in sources[i + 1:]:
            lo, hi = (a, b) if scores[index[a]].mean() <= scores[index[b]].mean() else (b, a)
            x, y = scores[index[hi]], scores[index[lo]]
            ranks = rankdata(np.concatenate([x, y]))
            auc = (ranks[: len(x)].sum() - len(x) * (len(x) + 1) / 2) / (len(x) * len(y))
            ratios = {}
            for method, e in eps.items():
                low_mean = None if e is None else float(e[index[lo]].mean())
                ratios[method] = (float(e[index[hi]].mean()) / low_mean) if low_mean else None
            out.append({"high": hi, "low": lo, "n_high": len(x), "n_low": len(y), "auc": float(auc),
                        "mean_score_high": float(x.mean()), "mean_score_low": float(y.mean()),
                        "eps_ratio": ratios})
    return out


def scores_report(scores_path: str | Path, out_dir: str | Path, compare_with: list[str | Path] = (),
                  smoothing=None) -> dict:
    """Write scores_report.json, failures.jsonl, the histograms and one scatter plot per compared
    scorer (compare_N.png) into out_dir; return the report."""
    rows = load_scores(scores_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("compare_*.png"):
        stale.unlink()
    failed, kinds = failures(rows)
    comparisons = []
    separations = [{"scorer": _scorer_name({r["id"]: r for r in rows}), "pairs": separation(rows, smoothing=smoothing)}]
    for i, other in enumerate(compare_with):
        other_rows = load_scores(other)
        plot = comparison_plot(rows, other_rows, out_dir / f"compare_{i}.png")
        comparisons.append(rank_correlation(rows, other_rows) | {"other": str(other), "plot": plot and plot.name})
        separations.append({"scorer": _scorer_name({r["id"]: r for r in other_rows}),
                            "pairs": separation(other_rows, smoothing=smoothing)})
    report = {"scores": str(scores_path), "summary": summarize(rows), "failures": len(failed),
              "failure_reasons": kinds,
              "histograms": [p.name for p in histograms(rows, out_dir)],
              "rank_correlation": comparisons,
              "separation": separations,
              "separation_settings": None if smoothing is None else
              {"target_mean": smoothing.target_mean, "eps_max": smoothing.eps_max, "normalize": smoothing.normalize}}
    write_jsonl(out_dir / "failures.jsonl", failed)
    write_json(out_dir / "scores_report.json", report)
    return report
