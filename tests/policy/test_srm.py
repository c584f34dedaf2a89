"""Sample-ratio mismatch: GrowthBook's and scipy's reference values, and the alarm rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import chisquare

from rollguard.policy.srm import (
    SRM_CONCENTRATION,
    SRM_MIN_PER_ARM,
    SRM_PVALUE,
    chi_square_sf,
    sequential_srm_pvalue,
    srm_alarm,
    srm_pvalue,
)


@pytest.mark.parametrize(
    ("counts", "weights", "expected"),
    [  # growthbook back-end/test/stats.test.ts, checkSrm
        ([1000, 1200], [0.5, 0.5], 0.000020079),
        ([135, 115], [0.5, 0.5], 0.205903211),
        ([310, 98], [0.75, 0.25], 0.647434186),
        # GrowthBook's weights here are 0.34/0.33/0.33, not equal (equal gives 0.00193)
        ([500, 500, 600], [0.34, 0.33, 0.33], 0.000592638),
        ([0, 10, 10], [0.34, 0.33, 0.33], 0.005790624),
        ([500, 500], [0.5, 0.5], 1.0),
    ],
)
def test_growthbook_reference_values(
    counts: list[int], weights: list[float], expected: float
) -> None:
    assert srm_pvalue(counts, weights) == pytest.approx(expected, abs=5e-10)


def test_scipy_chisquare_reference() -> None:
    assert srm_pvalue([500, 500, 600], [1, 1, 1]) == pytest.approx(
        chisquare([500, 500, 600]).pvalue
    )
    counts = [16, 18, 16, 14, 12, 12]
    assert srm_pvalue(counts, [1] * 6) == pytest.approx(0.849145, abs=5e-7)
    assert chisquare(counts).statistic == pytest.approx(2.0)


@given(
    st.lists(st.integers(0, 10_000), min_size=2, max_size=6).filter(lambda c: sum(c) > 0),
    st.data(),
)
def test_agrees_with_scipy_for_any_counts_and_weights(
    counts: list[int], data: st.DataObject
) -> None:
    weights = data.draw(st.lists(st.floats(0.01, 100), min_size=len(counts), max_size=len(counts)))
    total, wsum = sum(counts), sum(weights)
    expected = [total * w / wsum for w in weights]
    reference = chisquare(counts, f_exp=expected).pvalue
    assert srm_pvalue(counts, weights) == pytest.approx(reference, rel=1e-9, abs=1e-300)


@given(
    st.integers(1, 2_000),
    st.one_of(st.floats(0.0, 5_000.0), st.floats(1e-12, 1e-3), st.floats(0.5, 3.0)),
)
def test_chi_square_sf_is_scipys(df: int, scale: float) -> None:
    """Our survival function against scipy's chdtrc, around the mean and deep in both tails
    (scipy is a test dependency only: the gateway computes it without scipy)."""
    from scipy.special import chdtrc

    statistic = scale * df if scale < 4.0 else scale
    assert chi_square_sf(statistic, df) == pytest.approx(
        float(chdtrc(df, statistic)), rel=1e-10, abs=1e-300
    )


def test_chi_square_sf_edges() -> None:
    assert chi_square_sf(0.0, 3) == 1.0
    assert chi_square_sf(-1.0, 3) == 1.0
    assert chi_square_sf(1e6, 1) == 0.0  # below the smallest double
    assert chi_square_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-12)
    with pytest.raises(ValueError, match="df"):
        chi_square_sf(1.0, 0)


def test_weights_are_scale_free_and_nothing_to_test_is_p_one() -> None:
    assert srm_pvalue([950, 50], [95, 5]) == srm_pvalue([950, 50], [0.95, 0.05])
    assert srm_pvalue([0, 0], [1, 1]) == 1.0


def test_alarm_needs_a_small_pvalue_and_enough_expected_per_arm() -> None:
    assert SRM_PVALUE == 0.001 and SRM_MIN_PER_ARM == 8
    assert srm_alarm([1000, 1200], [50, 50])
    assert not srm_alarm([135, 115], [50, 50])
    # 20 requests at a 5 % split expect 1 on the candidate: too few to judge anything
    assert not srm_alarm([20, 0], [95, 5])
    # a candidate that receives none of its share is the plainest mismatch of all
    assert srm_alarm([400, 0], [80, 20])
    assert not srm_alarm([100, 0], [95, 5])  # expects 5 < 8


def test_bad_input_raises() -> None:
    for counts, weights in (([1], [1]), ([1, 2], [1]), ([-1, 2], [1, 1]), ([1, 2], [0, 1])):
        with pytest.raises(ValueError):
            srm_pvalue(counts, weights)


# -- the anytime-valid test the checks decide on --


@pytest.mark.parametrize(("n", "candidate"), [(1000, 320), (400, 70), (5000, 1180), (50, 5)])
def test_sequential_matches_beta_binomial_over_binomial(n: int, candidate: int) -> None:
    """Two arms: BF = BetaBinomial(k·w, k·(1−w)) pmf / Binomial(w) pmf (scipy's own)."""
    from scipy.stats import betabinom, binom

    w, k = 0.25, SRM_CONCENTRATION
    inverse_bf = binom.pmf(candidate, n, w) / betabinom.pmf(candidate, n, k * w, k * (1 - w))
    got = sequential_srm_pvalue([n - candidate, candidate], [75, 25])
    assert got == pytest.approx(min(1.0, inverse_bf), rel=1e-9)


def test_sequential_three_arms_matches_dirichlet_multinomial() -> None:
    from scipy.stats import dirichlet_multinomial, multinomial

    counts, theta = [500, 500, 600], np.array([1 / 3] * 3)
    inverse_bf = multinomial.pmf(counts, 1600, theta) / dirichlet_multinomial.pmf(
        counts, SRM_CONCENTRATION * theta, 1600
    )
    assert sequential_srm_pvalue(counts, [1, 1, 1]) == pytest.approx(inverse_bf, rel=1e-9)
    # More conservative than Pearson at one look: it pays for being valid at every look.
    assert sequential_srm_pvalue(counts, [1, 1, 1]) > srm_pvalue(counts, [1, 1, 1])


def test_sequential_looked_at_every_ten_requests_rarely_alarms_on_a_healthy_split() -> None:
    """A/A: 300 rollouts at a true 25 % split, 3,000 requests each, a look every 10.
    Ville's inequality bounds the share ever alarming at p < 0.001 by 0.001; Pearson at
    the same threshold and looks alarms far more often."""
    rng = np.random.default_rng(7)
    looks = np.arange(10, 3001, 10)
    sequential = pearson = 0
    for _ in range(300):
        candidate = np.cumsum(rng.random(3000) < 0.25)[looks - 1]
        counts = [(int(n - c), int(c)) for n, c in zip(looks, candidate, strict=True)]
        sequential += any(sequential_srm_pvalue(c, [75, 25]) < SRM_PVALUE for c in counts)
        pearson += any(srm_alarm(c, [75, 25]) for c in counts)
    assert sequential <= 2  # 0.7 %: the bound is 0.1 %, with room for chance
    assert pearson > sequential


def test_sequential_finds_a_real_mismatch() -> None:
    """Configured 25 %, delivered 20 %: found within a few thousand requests."""
    rng = np.random.default_rng(11)
    found_at = []
    for _ in range(20):
        candidate = np.cumsum(rng.random(20_000) < 0.20)
        for n in range(100, 20_001, 100):
            c = int(candidate[n - 1])
            if sequential_srm_pvalue([n - c, c], [75, 25]) < SRM_PVALUE:
                found_at.append(n)
                break
    assert len(found_at) == 20
    assert float(np.median(found_at)) < 6_000


def test_sequential_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="concentration"):
        sequential_srm_pvalue([1, 2], [1, 1], concentration=0)
    with pytest.raises(ValueError, match="negative"):
        sequential_srm_pvalue([-1, 2], [1, 1])
    assert sequential_srm_pvalue([0, 0], [1, 1]) == 1.0
