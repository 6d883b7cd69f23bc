import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ual.smoothing import fit_scale, map_to_smoothing, uniform_smoothing


def test_mean_hits_target_and_cap_holds():
    rng = np.random.default_rng(0)
    u = rng.uniform(0, 1, size=1000)
    for target in (0.05, 0.1, 0.3, 0.5, 0.9):
        eps = map_to_smoothing(u, target, eps_max=0.99)
        assert abs(eps.mean() - target) < 1e-9
        assert eps.max() <= 0.99 + 1e-15
        assert eps.min() >= 0


def test_clipping_is_exact_when_many_samples_hit_the_cap():
    u = np.array([1.0, 0.9, 0.8, 0.01, 0.01, 0.0])
    eps = map_to_smoothing(u, target_mean=0.5, eps_max=0.99)
    assert abs(eps.mean() - 0.5) < 1e-12
    assert np.sum(eps == 0.99) >= 2  # the large scores are clipped
    # unclipped samples stay proportional to their scores
    k = fit_scale(u, 0.5, 0.99)
    free = eps < 0.99
    np.testing.assert_allclose(eps[free], k * u[free])


def test_zero_scores_get_zero_and_order_is_preserved():
    u = np.array([0.0, 0.2, 0.0, 0.7, 0.4])
    eps = map_to_smoothing(u, 0.1)
    assert eps[0] == 0 and eps[2] == 0
    assert np.all(np.diff(eps[np.argsort(u)]) >= 0)


def test_zero_target_is_sft():
    assert np.all(map_to_smoothing([0.3, 0.9], 0.0) == 0)


@pytest.mark.parametrize(
    "scores,target,match",
    [
        ([0.0, 0.0], 0.1, "every score is 0"),
        ([0.5, 0.5], 0.99, "must be below eps_max"),
        ([0.5, float("nan")], 0.1, "not a finite number"),
        ([0.5, 1.5], 0.1, r"must lie in \[0, 1\]"),
        ([1.0, 0.0, 0.0, 0.0], 0.5, "unreachable"),
        ([], 0.1, "no scores"),
        ([0.5], -0.1, ">= 0"),
    ],
)
def test_impossible_requests_raise(scores, target, match):
    with pytest.raises(ValueError, match=match):
        map_to_smoothing(scores, target)


def test_uniform_smoothing():
    assert np.all(uniform_smoothing(3, 0.1) == 0.1)


@settings(max_examples=200, deadline=None)
@given(
    # scores below 1e-12 are taken as 0: a finite scale cannot lift them to a useful eps
    st.lists(st.floats(0, 1).map(lambda x: 0.0 if x < 1e-12 else x), min_size=1, max_size=60),
    st.floats(0.001, 0.95),
)
def test_property_mean_and_cap(scores, target):
    u = np.array(scores)
    positive = np.count_nonzero(u > 0)
    if positive == 0 or target > 0.99 * positive / u.size:
        with pytest.raises(ValueError):
            map_to_smoothing(u, target)
        return
    eps = map_to_smoothing(u, target)
    assert abs(eps.mean() - target) < 1e-9
    assert eps.max() <= 0.99 + 1e-12
    assert np.all(eps[u == 0] == 0)


def test_tiny_score_under_a_large_one_keeps_the_exact_mean():
    # Found by hypothesis in CI: summing the unclipped tail as "total - prefix"
    # lost the 1e-12 to cancellation and the mean came out 4e-7 short.
    eps = map_to_smoothing([1.0, 1e-12], 0.5)
    assert abs(eps.mean() - 0.5) < 1e-12
    assert eps[0] == 0.99


# --------------------------------------------------------------------------- normalisation


def test_normalize_max_keeps_the_map_proportional():
    from ual.smoothing import normalize_scores

    raw = np.array([0.5, 1.0, 2.0, 4.0])  # raw scores need not lie in [0, 1]
    u = normalize_scores(raw, "max")
    assert u.tolist() == [0.125, 0.25, 0.5, 1.0]
    # The map is scale-free: max normalisation gives the same eps as the raw scores' ratios.
    assert np.allclose(map_to_smoothing(u, 0.1), 0.1 * raw / raw.mean())


def test_normalize_minmax_and_rank_on_known_inputs():
    from ual.smoothing import normalize_scores

    raw = [2.0, 4.0, 4.0, 10.0]
    assert normalize_scores(raw, "minmax").tolist() == [0.0, 0.25, 0.25, 1.0]
    # Ties share their average rank: ranks 1, 2.5, 2.5, 4 -> (r - 1) / 3.
    assert normalize_scores(raw, "rank").tolist() == pytest.approx([0.0, 0.5, 0.5, 1.0])
    # Rank ignores the scale: an outlier moves nothing.
    assert normalize_scores([2.0, 4.0, 4.0, 1e9], "rank").tolist() == pytest.approx([0.0, 0.5, 0.5, 1.0])
    # The lowest sample gets eps 0 after the map; the mean is still the target.
    eps = map_to_smoothing(normalize_scores(raw, "minmax"), 0.1)
    assert eps[0] == 0 and eps.mean() == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["minmax", "rank"])
def test_normalize_refuses_what_cannot_be_spread(method):
    from ual.smoothing import normalize_scores

    with pytest.raises(ValueError, match="all 3 scores equal 0.4"):
        normalize_scores([0.4, 0.4, 0.4], method)
    with pytest.raises(ValueError, match="the single score equal"):
        normalize_scores([0.7], method)


def test_normalize_max_documented_edge_cases_and_bad_input():
    from ual.smoothing import normalize_scores

    assert normalize_scores([0.7], "max").tolist() == [1.0]  # one sample: u = 1, eps = the target
    assert normalize_scores([0.3, 0.3], "max").tolist() == [1.0, 1.0]  # constant: uniform smoothing
    with pytest.raises(ValueError, match="normalize must be one of max, minmax, rank"):
        normalize_scores([0.1, 0.2], "zscore")
    with pytest.raises(ValueError, match=r"\[0, inf\); score 1 is -0.5"):
        normalize_scores([0.1, -0.5], "max")
    with pytest.raises(ValueError, match="not a finite number"):
        normalize_scores([0.1, float("nan")], "rank")
