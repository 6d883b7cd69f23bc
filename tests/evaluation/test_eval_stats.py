"""Model-comparison statistics: paired bootstrap, token-weighted ratios, equal-mass ECE, seeds, buckets, plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ual.evaluation.stats import (
    Interval,
    across_seeds,
    ece,
    grouped_ece_difference,
    grouped_ece_interval,
    paired_bootstrap,
    paired_mean_difference,
    paired_ratio_difference,
    quantile_buckets,
    reliability_bins,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _paired_draw(rng, n=60, delta=0.3):
    # a large item effect x shared by both models, small per-model noise
    x = rng.normal(0, 5, n)
    return x + delta + rng.normal(0, 0.5, n), x + rng.normal(0, 0.5, n)


def test_paired_mean_difference_covers_true_delta():
    rng = np.random.default_rng(123)
    delta = 0.3
    covered = 0
    for draw in range(100):
        a, b = _paired_draw(rng, delta=delta)
        iv = paired_mean_difference(a, b, seed=draw)
        assert iv.estimate == pytest.approx(np.mean(a - b))
        assert iv.n == 60 and iv.level == 0.95
        covered += iv.low <= delta <= iv.high
    assert covered >= 90


def test_pairing_removes_between_item_variance():
    rng = np.random.default_rng(7)
    a, b = _paired_draw(rng)
    paired = paired_mean_difference(a, b, seed=0)
    # the same statistic with a and b resampled independently (what pairing avoids)
    boots = [a[rng.integers(0, 60, 60)].mean() - b[rng.integers(0, 60, 60)].mean() for _ in range(2000)]
    low, high = np.quantile(boots, [0.025, 0.975])
    assert (high - low) > 5 * (paired.high - paired.low)
    assert paired.excludes_zero and not (low > 0 or high < 0)


def test_paired_bootstrap_is_a_plain_percentile_bootstrap_with_the_seed():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=40), rng.normal(size=40)
    iv = paired_bootstrap(lambda idx: float(np.median(a[idx]) - np.median(b[idx])), 40, n_boot=500, seed=9)
    loop_rng = np.random.default_rng(9)
    boots = []
    for _ in range(500):
        idx = loop_rng.integers(0, 40, size=40)
        boots.append(np.median(a[idx]) - np.median(b[idx]))
    assert iv.estimate == pytest.approx(np.median(a) - np.median(b))
    assert (iv.low, iv.high) == pytest.approx(tuple(np.percentile(boots, [2.5, 97.5])))
    assert iv.method == "paired bootstrap (percentile, 500 resamples)"


def test_paired_bootstrap_nan_resamples_and_tiny_inputs():
    # nan when item 0 is drawn at least twice (~26% of resamples): skipped and counted
    some = paired_bootstrap(lambda idx: math.nan if (idx == 0).sum() >= 2 else float(idx.mean()), 10, seed=0)
    assert some.low is not None and some.low < some.high
    assert "nan skipped" in some.method
    # nan whenever item 0 is drawn (~65%): no interval
    most = paired_bootstrap(lambda idx: math.nan if 0 in idx else 1.0, 10, seed=0)
    assert most.low is None and most.high is None and not most.excludes_zero

    one = paired_mean_difference([3.0], [1.0])
    assert one.estimate == 2.0 and one.low is None and one.high is None and one.n == 1
    none = paired_bootstrap(lambda idx: 1.0, 0)
    assert math.isnan(none.estimate) and none.low is None
    d = none.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["estimate"] is None and d["excludes_zero"] is False
    with pytest.raises(ValueError):
        paired_mean_difference([1.0, 2.0], [1.0])


def test_interval_to_dict_and_excludes_zero():
    iv = Interval(0.5, 0.1, 0.9, 0.95, 10, "m")
    assert iv.to_dict() == {"estimate": 0.5, "low": 0.1, "high": 0.9, "level": 0.95, "n": 10, "method": "m",
                            "excludes_zero": True}
    assert Interval(-0.5, -0.9, -0.1, 0.95, 10, "m").excludes_zero
    assert not Interval(0.5, -0.1, 0.9, 0.95, 10, "m").excludes_zero


def test_paired_ratio_difference_estimate_and_resampling():
    # (2+4+6)/(1+2+3) - (1+1+1)/(1+1+2) = 2 - 0.75
    iv = paired_ratio_difference([2, 4, 6], [1, 2, 3], [1, 1, 1], [1, 1, 2])
    assert iv.estimate == pytest.approx(1.25)

    rng = np.random.default_rng(3)
    n = 300
    den = rng.integers(5, 200, n).astype(float)
    num_a = den * rng.gamma(4, 0.5, n)
    num_b = num_a * 0.97 + rng.normal(0, 5, n)
    fast = paired_ratio_difference(num_a, den, num_b, den, seed=4)
    slow = paired_bootstrap(
        lambda idx: num_a[idx].sum() / den[idx].sum() - num_b[idx].sum() / den[idx].sum(), n, seed=4)
    assert fast.estimate == pytest.approx(num_a.sum() / den.sum() - num_b.sum() / den.sum())
    assert (fast.estimate, fast.low, fast.high) == pytest.approx((slow.estimate, slow.low, slow.high), rel=1e-12)
    assert fast.method == slow.method


def test_ece_hand_computed():
    # sorted: [0.1, 0.2, 0.3 | 0.4, 0.7, 0.9], correct [0, 0, 1 | 1, 1, 0]
    # bin 0: conf 0.2, acc 1/3 -> |1/3 - 0.2| = 2/15; bin 1: conf 2/3, acc 2/3 -> 0
    # ECE = 0.5 * 2/15 + 0.5 * 0 = 1/15 (equal-width bins [0, .5), [.5, 1] would give 4/15)
    conf = [0.7, 0.1, 0.9, 0.3, 0.4, 0.2]
    correct = [1, 0, 0, 1, 1, 0]
    assert ece(conf, correct, n_bins=2) == pytest.approx(1 / 15)
    bins = reliability_bins(conf, correct, n_bins=2)
    assert [b["weight"] for b in bins] == [3.0, 3.0]
    assert [(b["low"], b["high"]) for b in bins] == [(0.1, 0.3), (0.4, 0.9)]
    assert bins[1]["confidence"] == pytest.approx(2 / 3) and bins[1]["accuracy"] == pytest.approx(2 / 3)
    # more bins than points: one point per bin, ECE = mean |correct - confidence|
    assert len(reliability_bins(conf, correct, n_bins=15)) == 6
    assert ece(conf, correct, n_bins=15) == pytest.approx(np.mean(np.abs(np.array(correct) - conf)))
    assert math.isnan(ece([], []))
    with pytest.raises(ValueError):
        ece([0.5, 1.2], [1, 0])


def test_weighted_ece_equals_repeated_rows():
    rng = np.random.default_rng(5)
    conf = np.round(rng.uniform(0, 1, 200), 2)  # rounding makes ties
    correct = rng.uniform(0, 1, 200) < conf**2
    weights = rng.integers(0, 4, 200)
    rep_conf, rep_correct = np.repeat(conf, weights), np.repeat(correct, weights)
    weighted = reliability_bins(conf, correct, n_bins=7, weights=weights)
    repeated = reliability_bins(rep_conf, rep_correct, n_bins=7)
    assert len(weighted) == len(repeated) >= 5
    for w, r in zip(weighted, repeated):
        assert w == pytest.approx(r)
    assert ece(conf, correct, 7, weights) == pytest.approx(ece(rep_conf, rep_correct, 7))
    # tied confidences never split, so input order does not matter
    perm = rng.permutation(200)
    assert ece(conf[perm], correct[perm], 7, weights[perm]) == pytest.approx(ece(conf, correct, 7, weights))


def test_ece_calibrated_and_confidently_wrong():
    rng = np.random.default_rng(11)
    conf = rng.uniform(0, 1, 20000)
    correct = rng.uniform(0, 1, 20000) < conf
    assert ece(conf, correct) < 0.02
    assert ece(np.sqrt(conf), correct) > 0.1  # overconfident
    wrong_conf = rng.uniform(0.7, 1.0, 500)
    assert ece(wrong_conf, np.zeros(500)) == pytest.approx(wrong_conf.mean())


def _token_data(rng, n_items=150):
    lengths = rng.integers(5, 30, n_items)
    item_index = np.repeat(np.arange(n_items), lengths)
    difficulty = rng.uniform(0.2, 0.95, n_items)[item_index]
    conf = np.clip(difficulty + rng.normal(0, 0.05, item_index.size), 0, 1)
    correct = rng.uniform(0, 1, item_index.size) < conf
    return conf, correct, item_index, n_items


def test_grouped_ece_difference():
    rng = np.random.default_rng(2)
    conf, correct, item_index, n_items = _token_data(rng)
    same = grouped_ece_difference(conf, correct, conf, correct, item_index, n_items, n_boot=300)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    over = conf**0.3  # pushed towards 1 with the same answers
    iv = grouped_ece_difference(over, correct, conf, correct, item_index, n_items, n_boot=300)
    assert iv.estimate == pytest.approx(ece(over, correct) - ece(conf, correct))
    assert iv.estimate > 0 and iv.excludes_zero and iv.n == n_items


def test_grouped_ece_interval_resamples_items():
    rng = np.random.default_rng(8)
    conf, correct, item_index, n_items = _token_data(rng)
    iv = grouped_ece_interval(conf, correct, item_index, n_items, n_boot=300, seed=1)
    assert iv.estimate == pytest.approx(ece(conf, correct))
    assert iv.low < iv.estimate < iv.high
    # one resample by hand: items drawn with replacement, each bringing all its tokens
    idx = np.random.default_rng(1).integers(0, n_items, n_items)
    rows = np.concatenate([np.flatnonzero(item_index == i) for i in idx])
    one = grouped_ece_interval(conf, correct, item_index, n_items, n_boot=1, seed=1)
    assert one.low == one.high == pytest.approx(ece(conf[rows], correct[rows]))


def test_across_seeds():
    iv = across_seeds([1.0, 2.0, 3.0])
    half = 4.3027 / math.sqrt(3)  # t_{0.975, 2} from the table, sd = 1
    assert iv.estimate == 2.0
    assert (iv.low, iv.high) == pytest.approx((2 - half, 2 + half), rel=1e-4)
    assert iv.method == "t across 3 seeds" and iv.n == 3 and not iv.excludes_zero
    single = across_seeds([0.7])
    assert single.estimate == 0.7 and single.low is None and single.high is None


def test_quantile_buckets():
    u = np.array([8, 3, 5, 1, 7, 2, 6, 4], dtype=float)
    buckets, edges = quantile_buckets(u)
    assert np.bincount(buckets, minlength=4).tolist() == [2, 2, 2, 2]
    assert buckets[np.argsort(u)].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(edges) == 5 and edges[0] == 1 and edges[-1] == 8
    tied = np.array([0, 1, 2, 3, 3, 3, 4, 5], dtype=float)
    for perm in (np.arange(8), np.arange(8)[::-1], np.array([4, 0, 7, 3, 1, 6, 5, 2])):
        b, _ = quantile_buckets(tied[perm])
        assert len(set(b[tied[perm] == 3].tolist())) == 1
        reference = dict(zip(tied.tolist(), quantile_buckets(tied)[0].tolist()))
        assert dict(zip(tied[perm].tolist(), b.tolist())) == reference
    few, _ = quantile_buckets([1.0, 1.0, 1.0, 2.0])
    assert few.tolist() == [0, 0, 0, 3]  # edges 1, 1, 1, 1.25, 2: buckets 1 and 2 stay empty
    with pytest.raises(ValueError):
        quantile_buckets([])


def test_reliability_plots_write_png(tmp_path):
    from ual.report.plots import plot_reliability, plot_reliability_grid

    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 500)
    correct = rng.uniform(0, 1, 500) < conf
    curves = {"base": reliability_bins(conf, correct), "smoothed": reliability_bins(np.sqrt(conf), correct)}
    one = plot_reliability(curves, tmp_path / "rel.png")
    grid = plot_reliability_grid({"gsm8k": curves, "sharegpt": curves, "multiple choice": {}},
                                 tmp_path / "grid.png", "calibration per source")
    for path in (one, grid):
        assert path.read_bytes()[:8] == PNG_SIGNATURE
