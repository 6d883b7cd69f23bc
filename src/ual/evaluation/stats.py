"""Statistics for comparing models: paired bootstrap intervals, calibration, seeds, buckets.

- `paired_bootstrap` (and its vectorised cases `paired_mean_difference`,
  `paired_ratio_difference`): both models are scored on the same items, so
  each resample draws ONE set of item indices and evaluates both models on it.
  The large between-item variance (easy vs hard questions) is then shared by A
  and B and cancels in the difference; resampling A and B independently would
  count it twice and give intervals many times wider. Intervals are
  percentile intervals: no normality assumption for statistics such as ratios
  of sums or ECE, whose sampling distributions are skewed or bounded at 0.
- `ece` / `reliability_bins`: expected calibration error with equal-MASS bins.
  Token confidences of a language model pile up near 1, so equal-width bins
  leave most bins nearly empty and the few full ones hide the miscalibration;
  equal-mass bins give every bin the same share of evidence. Weights (integer
  item multiplicities, from a bootstrap over items) act as repeated rows.
- `grouped_ece_difference` / `grouped_ece_interval`: tokens are not
  independent (a text is confidently right or wrong as a whole), so the
  bootstrap resamples items and every token takes its item's multiplicity.
- `across_seeds`: training-seed variation, Student-t interval over the
  per-seed values (few seeds, so t rather than normal quantiles).
- `quantile_buckets`: split items by quantiles of a covariate (e.g. the
  smoothing strength u) for per-bucket comparisons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats as _sps

# Elements per index matrix chunk: bounds memory (2000 x 10k int64 indices
# would be 160 MB) while keeping the per-chunk numpy work vectorised.
_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class Interval:
    """A statistic with its confidence interval; low/high None when none can be given."""

    estimate: float  # on the full, unresampled data
    low: float | None
    high: float | None
    level: float
    n: int  # items (bootstrap) or seeds
    method: str

    @property
    def excludes_zero(self) -> bool:
        if self.low is None or self.high is None:
            return False
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        def num(x):
            # nan / inf are not JSON; a missing value is the honest encoding
            return None if x is None or not math.isfinite(x) else float(x)

        return {"estimate": num(self.estimate), "low": num(self.low), "high": num(self.high),
                "level": float(self.level), "n": int(self.n), "method": self.method,
                "excludes_zero": self.excludes_zero}


def _index_chunks(rng: np.random.Generator, n_items: int, n_boot: int):
    # Row r is the r-th resample; with default_rng a (k, n) draw equals k
    # successive draws of n, so every caller sees the same resamples per seed.
    rows = max(1, _CHUNK_ELEMENTS // n_items)
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n_items, size=(min(rows, n_boot - start), n_items))


def _bootstrap(stat_rows, n_items: int, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    # stat_rows(index matrix) -> the statistic per row (resample); the vectorised
    # statistics and paired_bootstrap share it, so a seed means the same resamples
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    with np.errstate(divide="ignore", invalid="ignore"):  # nan resamples are expected, and counted
        estimate = float(stat_rows(np.arange(n_items)[None, :])[0]) if n_items >= 1 else math.nan
        if n_items < 2:
            return Interval(estimate, None, None, level, n_items, "paired bootstrap (n < 2: no interval)")
        rng = np.random.default_rng(seed)
        boots = np.concatenate([np.asarray(stat_rows(idx), dtype=float)
                                for idx in _index_chunks(rng, n_items, n_boot)])
    finite = boots[~np.isnan(boots)]
    n_nan = boots.size - finite.size
    method = f"paired bootstrap (percentile, {n_boot} resamples{f', {n_nan} nan skipped' if n_nan else ''})"
    if n_nan > boots.size / 2 or finite.size == 0:
        return Interval(estimate, None, None, level, n_items, method)
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high), level, n_items, method)


def paired_bootstrap(diff_fn: Callable[[np.ndarray], float], n_items: int, *, n_boot: int = 2000,
                     level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile interval of diff_fn(idx) over item resamples shared by both models.

    n_items < 2 gives low/high None (nothing to resample), never an exception.
    Resamples where diff_fn is nan are skipped and counted in `method`; more
    than half nan gives low/high None.
    """
    return _bootstrap(lambda rows: [diff_fn(idx) for idx in rows], n_items, n_boot, level, seed)


def _vectors(*arrays) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=float).reshape(-1) for a in arrays]
    if len({a.size for a in out}) > 1:
        raise ValueError(f"paired arrays must have the same length, got {[a.size for a in out]}")
    return out


def paired_mean_difference(a, b, **kw) -> Interval:
    """mean(a - b) over items, a[i] and b[i] being the two models on item i."""
    a, b = _vectors(a, b)
    d = a - b
    return _bootstrap(lambda idx: d[idx].mean(axis=1), d.size, **kw)


def paired_ratio_difference(num_a, den_a, num_b, den_b, **kw) -> Interval:
    """sum(num_a)/sum(den_a) - sum(num_b)/sum(den_b): token-weighted metrics such as NLL per token."""
    num_a, den_a, num_b, den_b = _vectors(num_a, den_a, num_b, den_b)

    def stat_rows(idx):
        return num_a[idx].sum(axis=1) / den_a[idx].sum(axis=1) - num_b[idx].sum(axis=1) / den_b[idx].sum(axis=1)

    return _bootstrap(stat_rows, num_a.size, **kw)


# ---------------------------------------------------------------- calibration


def _prepare(confidence, correct):
    conf, corr = _vectors(confidence, correct)
    if conf.size and not ((conf >= 0) & (conf <= 1)).all():
        raise ValueError("confidence must lie in [0, 1]")
    order = np.argsort(conf, kind="stable")
    conf, corr = conf[order], corr[order]
    # Tied confidences form one group that is never split across bins, so the
    # bins do not depend on the input order of tied points, and a row with
    # integer weight k bins exactly like k repeated rows. starts: first token
    # of each group, then len(conf).
    starts = np.concatenate([[0], np.flatnonzero(conf[1:] != conf[:-1]) + 1, [conf.size]]) if conf.size else None
    return conf, corr, starts, order


def _bin_arrays(prepared, weights, n_bins: int, bounds: bool = True):
    """(weight, conf, accuracy[, low, high]) per non-empty bin; weights already in sorted order.

    Bins are runs of the sorted tokens, so per-bin sums are segment sums
    (reduceat) rather than scatters: this runs once per bootstrap resample.
    """
    conf, corr, starts, _ = prepared
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    w = np.ones(conf.size) if weights is None else weights
    cum = np.zeros(conf.size + 1)
    np.cumsum(w, out=cum[1:])
    total = cum[-1]
    if conf.size == 0 or total <= 0:
        return (np.empty(0),) * (5 if bounds else 3)
    # A group goes to the bin holding the middle of its mass: bins of nearly
    # equal mass, and one point per bin when there are fewer points than bins.
    lo, hi = (cum[:-1], cum[1:]) if starts.size == cum.size else (cum[starts[:-1]], cum[starts[1:]])
    scaled = (lo + hi) / 2 * n_bins / total
    first_group = np.searchsorted(scaled, np.arange(1, n_bins), side="left")
    cuts = np.unique(starts[np.concatenate([[0], first_group])])  # token where each non-empty bin starts
    cuts = cuts[cuts < conf.size]
    ends = np.append(cuts[1:], conf.size)
    wb = cum[ends] - cum[cuts]
    cb = np.add.reduceat(w * conf, cuts)
    ab = np.add.reduceat(w * corr, cuts)
    keep = wb > 0
    wb, cb, ab = wb[keep], cb[keep], ab[keep]
    out = (wb, cb / wb, ab / wb)
    if not bounds:
        return out
    pos = np.flatnonzero(w > 0)
    low = conf[pos[np.searchsorted(pos, cuts[keep], side="left")]]
    high = conf[pos[np.searchsorted(pos, ends[keep], side="left") - 1]]
    return out + (low, high)


def _ece_from_bins(wb, cb, ab) -> float:
    return float(np.sum(wb * np.abs(ab - cb)) / wb.sum()) if wb.size else math.nan


def reliability_bins(confidence, correct, n_bins: int = 15, weights=None) -> list[dict]:
    """Equal-mass bins: [{"confidence", "accuracy", "weight", "low", "high"}] in confidence order."""
    prepared = _prepare(confidence, correct)
    if weights is not None:
        (weights,) = _vectors(weights)
        if weights.size != prepared[0].size or (weights < 0).any():
            raise ValueError("weights must be non-negative, one per confidence")
        weights = weights[prepared[3]]
    arrays = _bin_arrays(prepared, weights, n_bins)
    keys = ("weight", "confidence", "accuracy", "low", "high")
    return [dict(zip(keys, map(float, row))) for row in zip(*arrays)]


def ece(confidence, correct, n_bins: int = 15, weights=None) -> float:
    """sum_b (W_b / W) |accuracy_b - confidence_b| over the reliability_bins; nan when empty."""
    bins = reliability_bins(confidence, correct, n_bins, weights)
    wb, cb, ab = (np.array([b[k] for b in bins]) for k in ("weight", "confidence", "accuracy"))
    return _ece_from_bins(wb, cb, ab)


def _grouped_ece_fn(conf, correct, item_index, n_items: int, n_bins: int):
    # Sorting once and re-weighting per resample keeps the bootstrap O(tokens) per resample.
    prepared = _prepare(conf, correct)
    items = np.asarray(item_index, dtype=int).reshape(-1)
    if items.size != prepared[0].size:
        raise ValueError("item_index must have one entry per token")
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"item_index must lie in 0..{n_items - 1}")
    items = items[prepared[3]]

    def fn(idx):
        w = np.bincount(idx, minlength=n_items).astype(float)[items]
        return _ece_from_bins(*_bin_arrays(prepared, w, n_bins, bounds=False))

    return fn


def grouped_ece_difference(conf_a, correct_a, conf_b, correct_b, item_index, n_items, *, n_bins=15,
                           **kw) -> Interval:
    """ECE(A) - ECE(B) on the same tokens, paired bootstrap over the items the tokens belong to."""
    ece_a = _grouped_ece_fn(conf_a, correct_a, item_index, n_items, n_bins)
    ece_b = _grouped_ece_fn(conf_b, correct_b, item_index, n_items, n_bins)
    return paired_bootstrap(lambda idx: ece_a(idx) - ece_b(idx), n_items, **kw)


def grouped_ece_interval(conf, correct, item_index, n_items, *, n_bins=15, **kw) -> Interval:
    """One model's ECE with a bootstrap interval over items."""
    return paired_bootstrap(_grouped_ece_fn(conf, correct, item_index, n_items, n_bins), n_items, **kw)


# ---------------------------------------------------------------- seeds, buckets


def across_seeds(values, level: float = 0.95) -> Interval:
    """Mean over training seeds with a Student-t interval; one value gives low/high None."""
    (v,) = _vectors(values)
    n = v.size
    method = f"t across {n} seeds"
    if n < 2:
        return Interval(float(v[0]) if n else math.nan, None, None, level, n, method)
    mean = float(v.mean())
    half = float(_sps.t.ppf((1 + level) / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, level, n, method)


def quantile_buckets(u, n_buckets: int = 4) -> tuple[np.ndarray, list[float]]:
    """Bucket per item by quantiles of u, and the n_buckets + 1 edges (min..max).

    Bucket b holds (edge_b, edge_b+1], the first bucket also its lower edge,
    as pandas.qcut. Equal values always share a bucket, whatever their order.
    """
    (u,) = _vectors(u)
    if u.size == 0 or not np.isfinite(u).all():
        raise ValueError("quantile_buckets needs at least one value, all finite")
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    edges = np.quantile(u, np.linspace(0, 1, n_buckets + 1))
    return np.searchsorted(edges[1:-1], u, side="left"), [float(e) for e in edges]
