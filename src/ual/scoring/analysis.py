"""Scores report: what the scorer said, per data source, what failed and why, and how two scorers agree.

Reads the scores.jsonl rows `ual score` writes ({"id", "source", "score",
"scorer", "details"}) as columns (runfolder.read_score_table: arrays, not a dict a row, so a
file of a million rows costs tens of MB; only the failed rows are read whole). Produces:
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
import sys
from collections import Counter
from pathlib import Path

from ual.io import write_json, write_jsonl
from ual.runfolder import ScoreTable, equal_neighbours, read_score_table

_CHUNK = 1 << 16  # values turned into Python floats at a time, where Python's own arithmetic is needed


def _as_table(scores) -> ScoreTable:
    """A ScoreTable from a score file's path, a ScoreTable, or a list of row dicts (tests, small callers)."""
    if isinstance(scores, ScoreTable):
        return scores
    if isinstance(scores, (str, Path)):
        return read_score_table(Path(scores))
    import numpy as np
    import pyarrow as pa

    return ScoreTable(Path("<rows>"), pa.array([r["id"] for r in scores], pa.string()),
                      np.array([math.nan if r.get("score") is None else r["score"] for r in scores], dtype=np.float64),
                      np.array(["?" if r.get("source") is None else r["source"] for r in scores], dtype=object),
                      np.array([r.get("scorer") for r in scores], dtype=object),
                      [r for r in scores if r.get("score") is None])


def _by_source(source) -> list[tuple[str, object]]:
    """(source, indices of its rows in file order) per source, sorted by name."""
    import numpy as np
    import pandas as pd

    codes, names = pd.factorize(source)
    order = sorted(range(len(names)), key=lambda k: names[k])
    return [(names[k], np.flatnonzero(codes == k)) for k in order]


def _builtin_sum(values, compensated: bool = sys.version_info >= (3, 12)) -> float:
    """sum(values.tolist()) bit for bit, as the row-based report computed it, without a Python float a
    value: Python adds left to right (np.cumsum does too; np.sum adds pairwise, another rounding), and
    from 3.12 on keeps Neumaier's compensation term beside the running sum, vectorised here from the
    running sums."""
    import numpy as np

    if not len(values):
        return 0.0
    running = np.cumsum(values)
    total = 0.0 + float(running[-1])
    if compensated and len(values) > 1:
        before, x, after = running[:-1], values[1:], running[1:]
        terms = np.where(np.abs(before) >= np.abs(x), (before - after) + x, (x - after) + before)
        compensation = float(np.cumsum(terms)[-1])
        if compensation and math.isfinite(compensation):
            total += compensation
    return total


def _squared_deviations(values, mean: float):
    """(v - mean) ** 2 per value as Python computes it (libm pow: in about 1 value in 2,000 it rounds
    differently from numpy's v * v), a chunk of Python floats at a time."""
    import numpy as np

    out = np.empty(len(values), dtype=np.float64)
    for start in range(0, len(values), _CHUNK):
        out[start:start + _CHUNK] = [(v - mean) ** 2 for v in values[start:start + _CHUNK].tolist()]
    return out


def summarize(scores) -> dict:
    """Counts and moments per source and overall (scores: a ScoreTable, a path or row dicts)."""
    table = _as_table(scores)
    out = {"all": _stats(table.score)}
    out.update({src: _stats(table.score[index]) for src, index in _by_source(table.source)})
    return out


def _stats(score) -> dict:
    import numpy as np

    vals = np.sort(score[~np.isnan(score)])
    n, total = len(vals), len(score)
    if not n:
        return {"n": total, "scored": 0, "failed": total}
    mean = _builtin_sum(vals) / n
    sd = math.sqrt(_builtin_sum(_squared_deviations(vals, mean)) / n)
    median = float(vals[n // 2]) if n % 2 else (float(vals[n // 2 - 1]) + float(vals[n // 2])) / 2
    return {"n": total, "scored": n, "failed": total - n, "mean": mean, "std": sd,
            "min": float(vals[0]), "median": median, "max": float(vals[-1])}


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


def histograms(scores, out_dir: str | Path, bins: int = 20) -> list[Path]:
    """hist_<source>.png per source and hist_all.png (sources overlaid); returns the paths."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = _as_table(scores)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_source = [(src, table.score[index]) for src, index in _by_source(table.source)]
    by_source = [(src, vals[~np.isnan(vals)]) for src, vals in by_source]
    by_source = [(src, vals) for src, vals in by_source if len(vals)]
    edges = [i / bins for i in range(bins + 1)]
    paths = []
    for src, vals in by_source:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(vals, bins=edges, color="tab:blue", edgecolor="white")
        ax.set(title=f"{src}: n={len(vals)}, mean u={_builtin_sum(vals) / len(vals):.3f}", xlabel="u = score / 99",
               ylabel="samples", xlim=(0, 1))
        fig.tight_layout()
        path = out_dir / f"hist_{re.sub(r'[^A-Za-z0-9_.-]+', '_', src)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    if by_source:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for src, vals in by_source:
            ax.hist(vals, bins=edges, alpha=0.5, label=f"{src} (n={len(vals)})", density=True)
        ax.set(title="uncertainty per data source", xlabel="u = score / 99", ylabel="density", xlim=(0, 1))
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "hist_all.png", dpi=100)
        plt.close(fig)
        paths.append(out_dir / "hist_all.png")
    return paths


def _join(a: ScoreTable, b: ScoreTable):
    """For each of a's ids, the position of the same id in b (-1: b has none). Each side holds an id
    once, so a shared id is a pair of equal neighbours once both sides' ids are sorted together."""
    import numpy as np
    import pyarrow as pa

    i, j = equal_neighbours(pa.concat_arrays([a.ids, b.ids]))
    at_b = np.full(len(a.ids), -1, dtype=np.int64)
    at_b[np.minimum(i, j)] = np.maximum(i, j) - len(a.ids)
    return at_b


def rank_correlation(a, b) -> dict:
    """Spearman's rho between two scorers' scores on the ids both scored (a, b: score files' paths,
    ScoreTables or row dicts).

    Reports how many ids were shared and how many only one side had (or had
    failed), so a correlation over a small overlap is not mistaken for more.
    """
    import numpy as np
    from scipy.stats import spearmanr

    ta, tb = _as_table(a), _as_table(b)
    at_b = _join(ta, tb)
    shared = at_b >= 0
    common = shared & ~np.isnan(ta.score) & ~np.isnan(tb.score[np.where(shared, at_b, 0)])
    n_shared, n_common = int(shared.sum()), int(common.sum())
    out = {"scorer_a": _scorer_name(ta.scorer), "scorer_b": _scorer_name(tb.scorer), "n": n_common,
           "only_a": len(ta.score) - n_shared, "only_b": len(tb.score) - n_shared,
           "failed_either": n_shared - n_common, "spearman": None}
    if n_common < 3:
        out["note"] = "fewer than 3 ids scored by both"
        return out
    xa, xb = ta.score[common], tb.score[at_b[common]]
    rho = spearmanr(xa, xb).statistic if len(np.unique(xa)) > 1 and len(np.unique(xb)) > 1 else float("nan")
    if not math.isfinite(float(rho)):
        out["note"] = "a constant score on one side: rank correlation undefined"
    else:
        out["spearman"] = float(rho)
    return out


def _scorer_name(scorer) -> str | None:
    """The scorer of these rows (an array of each row's scorer); several: their names, comma-separated."""
    import pandas as pd

    names = set(pd.unique(scorer).tolist())
    return names.pop() if len(names) == 1 else ",".join(sorted(str(n) for n in names))


def comparison_plot(a, b, path: str | Path) -> Path | None:
    """Rank against rank of two scorers on the ids both scored, one colour per data source
    (ranks, as the Spearman correlation uses: the scorers' scales are unrelated). None: no overlap."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import rankdata

    ta, tb = _as_table(a), _as_table(b)
    at_b = _join(ta, tb)
    both = np.flatnonzero((at_b >= 0) & ~np.isnan(ta.score) & ~np.isnan(tb.score[np.where(at_b >= 0, at_b, 0)]))
    if not len(both):
        return None
    n = len(both)
    rank_a = rankdata(ta.score[both]) / n
    rank_b = rankdata(tb.score[at_b[both]]) / n
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for src, index in _by_source(ta.source[both]):
        ax.scatter(rank_a[index], rank_b[index], s=10, alpha=0.6, label=f"{src} (n={len(index)})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    name_b = _scorer_name(tb.scorer[~np.isnan(tb.score)])
    ax.set(xlabel=f"rank / n under {_scorer_name(ta.scorer[both])}", ylabel=f"rank / n under {name_b}",
           xlim=(0, 1.02), ylim=(0, 1.02), title=f"two scorers, {n} samples")
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


def _separation(table: ScoreTable, smoothing) -> list[dict]:
    import numpy as np

    scored = ~np.isnan(table.score)
    return separation_arrays(table.source[scored], table.score[scored], None, smoothing)


def scores_report(scores_path: str | Path, out_dir: str | Path, compare_with: list[str | Path] = (),
                  smoothing=None) -> dict:
    """Write scores_report.json, failures.jsonl, the histograms and one scatter plot per compared
    scorer (compare_N.png) into out_dir; return the report. Each score file is read once, as columns
    (runfolder.read_score_table), and one other scorer's file at a time is held beside the current one."""
    table = read_score_table(Path(scores_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("compare_*.png"):
        stale.unlink()
    failed, kinds = failures(table.failed)
    comparisons = []
    separations = [{"scorer": _scorer_name(table.scorer), "pairs": _separation(table, smoothing)}]
    for i, other in enumerate(compare_with):
        other_table = read_score_table(Path(other))
        plot = comparison_plot(table, other_table, out_dir / f"compare_{i}.png")
        comparisons.append(rank_correlation(table, other_table) | {"other": str(other), "plot": plot and plot.name})
        separations.append({"scorer": _scorer_name(other_table.scorer), "pairs": _separation(other_table, smoothing)})
    report = {"scores": str(scores_path), "summary": summarize(table), "failures": len(failed),
              "failure_reasons": kinds,
              "histograms": [p.name for p in histograms(table, out_dir)],
              "rank_correlation": comparisons,
              "separation": separations,
              "separation_settings": None if smoothing is None else
              {"target_mean": smoothing.target_mean, "eps_max": smoothing.eps_max, "normalize": smoothing.normalize}}
    write_jsonl(out_dir / "failures.jsonl", failed)
    write_json(out_dir / "scores_report.json", report)
    return report
