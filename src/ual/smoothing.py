"""Map per-sample uncertainty scores to per-sample label-smoothing values.

The paper's (lost) equations 1-2, recovered in docs/method.md §2:

    eps_i = min(eps_max, k * u_i),   k > 0 chosen so that mean_i(eps_i) = target_mean.

The reference code found k by "rescale to the mean, clip, repeat until within
0.001". The mean is a non-decreasing piecewise-linear function of k, so k can be
solved exactly: with the scores sorted in decreasing order and the m largest
clipped at eps_max, k = (N * target_mean - m * eps_max) / sum(unclipped u), and
exactly one m is consistent. `normalize_scores` turns raw scores into u first.
Pure numpy (and scipy's rankdata), no I/O.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np


def fit_scale(scores, target_mean: float, eps_max: float = 0.99) -> float:
    """Return the k for which mean(min(eps_max, k * scores)) == target_mean."""
    u = _validated_scores(scores)
    if not np.isfinite(target_mean) or target_mean < 0:
        raise ValueError(f"target_mean must be a finite number >= 0, got {target_mean}")
    if not 0 < eps_max <= 1:
        raise ValueError(f"eps_max must be in (0, 1], got {eps_max}")
    if target_mean >= eps_max:
        raise ValueError(f"target_mean ({target_mean}) must be below eps_max ({eps_max})")
    if target_mean == 0:
        return 0.0
    n = u.size
    positive = int(np.count_nonzero(u > 0))
    if positive == 0:
        raise ValueError("every score is 0: no scale can reach a positive target_mean")
    reachable = eps_max * positive / n
    if target_mean > reachable + 1e-12:
        raise ValueError(
            f"target_mean {target_mean} is unreachable: with {n - positive} of {n} scores at 0 "
            f"and a cap of {eps_max}, the largest possible mean is {reachable:.6f}"
        )

    desc = np.sort(u)[::-1]
    # tail[m] = sum of the scores left unclipped when the m largest are clipped,
    # summed from the smallest up: "total - prefix" would cancel catastrophically
    # when tiny scores sit under large ones (e.g. [1, 1e-12]).
    tail = np.append(np.cumsum(desc[::-1])[::-1], 0.0)
    budget = n * target_mean
    for m in range(positive):
        k = (budget - m * eps_max) / tail[m]
        clipped_ok = m == 0 or k * desc[m - 1] >= eps_max * (1 - 1e-12)
        unclipped_ok = k * desc[m] <= eps_max * (1 + 1e-12)
        if clipped_ok and unclipped_ok:
            return float(k)
    # target_mean == reachable: every positive score sits at the cap
    return float(eps_max / desc[positive - 1])


def map_to_smoothing(scores, target_mean: float, eps_max: float = 0.99) -> np.ndarray:
    """Per-sample label smoothing eps_i = min(eps_max, k * u_i) with mean(eps) = target_mean."""
    u = _validated_scores(scores)
    # Solve on u / max(u): the same eps, with k in a range where tiny scores
    # (even subnormal ones) cannot overflow it.
    top = u.max()
    v = u / top if top > 0 else u
    k = fit_scale(v, target_mean, eps_max)
    if not np.isfinite(k):
        raise ValueError(
            f"target_mean {target_mean} needs scores far from 0, but the unclipped ones are too small "
            f"(smallest positive {u[u > 0].min():.3g}) for a finite scale"
        )
    return np.minimum(eps_max, k * v)


Normalization = Literal["max", "minmax", "rank"]
NORMALIZATIONS = get_args(Normalization)


def normalize_scores(scores, method: str = "max") -> np.ndarray:
    """Raw uncertainty scores -> u in [0, 1], before the map (docs/scoring.md has a worked example).

    max     u = s / max(s). The map is scale-free, so eps stays proportional to the raw
            score (the paper's PPL variant; a judge's score / 99 maps the same way).
            No sample gets eps near 0 unless its score is near 0.
    minmax  u = (s - min) / (max - min): the lowest score gets eps 0, the highest the
            most; differences between scores, not their ratios, set the smoothing.
    rank    u = (rank - 1) / (n - 1), ties given their average rank: uniform over [0, 1]
            whatever the scale, so only the order of the scores matters (robust to a
            few extreme scores; the map's cap then binds on the top ranks first).
    minmax and rank need at least two distinct scores: with one sample or all scores
    equal there is nothing to spread (use max, which gives uniform smoothing then).
    """
    u = _validated_scores(scores, unit_range=False)
    if method == "max":
        top = u.max()
        return u / top if top > 0 else u
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {method!r}")
    lo, hi = u.min(), u.max()
    if not hi > lo:
        raise ValueError(f"normalize {method}: {'the single score' if u.size == 1 else f'all {u.size} scores'} "
                         f"equal {lo:g}, so there is nothing to spread over [0, 1]; use normalize max "
                         "(uniform smoothing) or score more varied data")
    if method == "minmax":
        return np.clip((u - lo) / (hi - lo), 0.0, 1.0)
    from scipy.stats import rankdata

    return (rankdata(u, method="average") - 1.0) / (u.size - 1)


def uniform_smoothing(n: int, target_mean: float) -> np.ndarray:
    """The label-smoothing baseline: every sample gets the same eps."""
    if not 0 <= target_mean < 1:
        raise ValueError(f"target_mean must be in [0, 1), got {target_mean}")
    return np.full(n, float(target_mean))


def _validated_scores(scores, unit_range: bool = True) -> np.ndarray:
    u = np.asarray(scores, dtype=np.float64).reshape(-1)
    if u.size == 0:
        raise ValueError("no scores to map")
    if not np.all(np.isfinite(u)):
        bad = int(np.flatnonzero(~np.isfinite(u))[0])
        raise ValueError(f"score {bad} is not a finite number ({u[bad]})")
    out = (u < 0) | (u > 1) if unit_range else u < 0
    if out.any():
        bad = int(np.flatnonzero(out)[0])
        raise ValueError(f"scores must lie in {'[0, 1]' if unit_range else '[0, inf)'}; score {bad} is {u[bad]}")
    return u
