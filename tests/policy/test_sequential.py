"""Always-valid confidence sequences: reference values, the unequal-n form, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import norm

from rollguard.policy.sequential import (
    difference_bounds,
    difference_sequence,
    mixture_halfwidth,
    rate_bounds,
    rate_sequence,
    sequential_rho,
    stratified_difference_sequence,
)


def test_rho_matches_the_brief_and_growthbook() -> None:
    assert sequential_rho(0.05, 5000) == pytest.approx(0.03984, abs=5e-6)
    # one-sided: GrowthBook evaluates rho at 2 alpha
    assert sequential_rho(0.05, 5000, one_sided=True) == pytest.approx(sequential_rho(0.1, 5000))


def test_growthbook_relative_lift_reference() -> None:
    """gbstats SequentialTwoSidedTTest, proportions 1396/3000 vs 2422/3461, N* 5000."""
    a, n_a, b, n_b = 1396 / 3000, 3000, 2422 / 3461, 3461
    # gbstats' relative effect: (mean_b - mean_a) / mean_a, delta-method variance,
    # Bernoulli variances p(1-p), and s2 = variance x total n.
    lift = (b - a) / a
    var = b * (1 - b) / (a**2 * n_b) + a * (1 - a) * b**2 / (a**4 * n_a)
    n = n_a + n_b
    half = float(mixture_halfwidth(var * n, n, 0.05, n_star=5000))
    assert (lift - half, lift + half) == pytest.approx((0.40098, 0.60675), abs=5e-6)


def _johari_halfwidth(v: float, n: float, tau2: float, alpha: float) -> float:
    """Johari et al. 2017: sqrt(V(V+nτ²)/(n²τ²)·[2 log(1/α) + log((V+nτ²)/V)])."""
    return math.sqrt(
        v
        * (v + n * tau2)
        / (n * n * tau2)
        * (2 * math.log(1 / alpha) + math.log((v + n * tau2) / v))
    )


@pytest.mark.parametrize("n", [1, 10, 200, 5000, 10**6])
def test_halfwidth_is_joharis_msprt_with_tau2_rho2_v(n: int) -> None:
    v, alpha = 0.0475, 0.05
    tau2 = sequential_rho(alpha) ** 2 * v
    assert float(mixture_halfwidth(v, n, alpha)) == pytest.approx(
        _johari_halfwidth(v, n, tau2, alpha), rel=1e-12
    )


@pytest.mark.parametrize(("x", "n", "null"), [(30, 1000, 0.01), (5, 200, 0.1), (900, 1000, 0.85)])
def test_two_sided_pvalue_is_one_over_johari_lambda(x: int, n: int, null: float) -> None:
    """Λn = sqrt(V/(V+nτ²))·exp(n²τ²(θ̂−θ₀)²/(2V(V+nτ²))), p = min(1, 1/Λn)."""
    alpha = 0.05
    v = _smoothed(x, n)
    tau2 = sequential_rho(alpha) ** 2 * v
    lam = math.sqrt(v / (v + n * tau2)) * math.exp(
        n * n * tau2 * (x / n - null) ** 2 / (2 * v * (v + n * tau2))
    )
    assert rate_sequence(x, n, alpha, null=null).pvalue == pytest.approx(min(1.0, 1 / lam))


def _smoothed(x: int, n: int) -> float:
    p = (x + 1) / (n + 2)
    return p * (1 - p)


def test_equal_arms_reduce_to_johari_per_arm_form() -> None:
    """m per arm: V = σ²_A + σ²_B, τ² = ρ²·2V (the module docstring's derivation)."""
    m, xa, xb, alpha = 4000, 40, 60, 0.05
    v = _smoothed(xa, m) + _smoothed(xb, m)
    tau2 = sequential_rho(alpha) ** 2 * 2 * v
    b = difference_sequence(xa, m, xb, m, alpha)
    assert b.estimate == pytest.approx(xb / m - xa / m)
    assert b.upper - b.estimate == pytest.approx(_johari_halfwidth(v, m, tau2, alpha), rel=1e-12)


@pytest.mark.parametrize(("n_a", "n_b"), [(19_000, 1_000), (1_000, 19_000), (50_000, 600)])
def test_unequal_arms_are_the_msprt_in_information_time(n_a: int, n_b: int) -> None:
    """I = 1/(σ²_A/n_A + σ²_B/n_B); half-width² = (1+Iτ²)/(I²τ²)·[2 log(1/α) + log(1+Iτ²)]."""
    xa, xb, alpha = n_a // 100, n_b // 50, 0.01
    va, vb = _smoothed(xa, n_a), _smoothed(xb, n_b)
    info = 1 / (va / n_a + vb / n_b)
    tau2 = sequential_rho(alpha) ** 2 * 2 * (va + vb)
    expected = math.sqrt(
        (1 + info * tau2) / (info**2 * tau2) * (2 * math.log(1 / alpha) + math.log1p(info * tau2))
    )
    b = difference_sequence(xa, n_a, xb, n_b, alpha)
    assert b.upper - b.estimate == pytest.approx(expected, rel=1e-12)
    # wider than the fixed-n z-interval, between the widths of both arms small or both large
    assert b.upper - b.lower > 2 * norm.isf(alpha / 2) * math.sqrt(vb / n_b + va / n_a)
    widths = []
    for m in (min(n_a, n_b), max(n_a, n_b)):
        same = difference_sequence(xa * m // n_a, m, xb * m // n_b, m, alpha)
        widths.append(same.upper - same.lower)
    assert widths[1] < b.upper - b.lower < widths[0]


@given(st.integers(100, 100_000), st.floats(0.001, 0.5), st.sampled_from([0.001, 0.01, 0.05, 0.2]))
def test_wider_than_scipys_fixed_n_interval(n: int, p: float, alpha: float) -> None:
    """Valid at every n at once costs width: never narrower than the z-interval at one n."""
    x = round(p * n)
    b = rate_sequence(x, n, alpha)
    z = norm.isf(alpha / 2) * math.sqrt(_smoothed(x, n) / n)
    assert b.upper - b.estimate >= z or b.upper == 1.0
    one = rate_sequence(x, n, alpha, side="lower")
    one_z = norm.isf(alpha) * math.sqrt(_smoothed(x, n) / n)
    assert one.estimate - one.lower >= one_z or one.lower == 0.0


@given(st.integers(0, 5000), st.integers(1, 5000), st.sampled_from(["two-sided", "lower", "upper"]))
def test_bounds_contain_the_estimate(x: int, extra: int, side: str) -> None:
    n = x + extra
    b = rate_sequence(x, n, 0.05, side=side)  # type: ignore[arg-type]
    assert 0.0 <= b.lower <= b.estimate <= b.upper <= 1.0
    d = difference_sequence(x, n, extra, n + 7, 0.05, side=side)  # type: ignore[arg-type]
    assert -1.0 <= d.lower <= d.estimate <= d.upper <= 1.0


@given(st.integers(0, 2000), st.integers(1, 2000))
def test_smaller_alpha_gives_wider_bounds(x: int, extra: int) -> None:
    n = x + extra
    loose, tight = rate_sequence(x, n, 0.1), rate_sequence(x, n, 0.001)
    assert tight.lower <= loose.lower and tight.upper >= loose.upper
    loose_d = difference_sequence(x, n, extra, n, 0.1, side="lower")
    tight_d = difference_sequence(x, n, extra, n, 0.001, side="lower")
    assert tight_d.lower <= loose_d.lower


@given(st.integers(1, 1000), st.integers(0, 1000), st.integers(2, 50))
def test_more_data_at_the_same_rate_shrinks_the_bounds(n: int, x_raw: int, k: int) -> None:
    x = min(x_raw, n)
    small, large = rate_sequence(x, n, 0.05), rate_sequence(k * x, k * n, 0.05)
    assert large.upper - large.lower <= small.upper - small.lower
    assert float(mixture_halfwidth(0.1, k * n, 0.05)) < float(mixture_halfwidth(0.1, n, 0.05))


@given(
    st.integers(0, 3000),
    st.integers(1, 3000),
    st.integers(0, 300),
    st.integers(1, 300),
    st.floats(0.0, 0.05),
)
def test_pvalue_below_alpha_exactly_when_the_bound_excludes_the_null(
    xa: int, ea: int, xb: int, eb: int, margin: float
) -> None:
    alpha = 0.05 / 3
    b = difference_sequence(xa, xa + ea, xb, xb + eb, alpha, side="lower", null=margin)
    if abs(b.lower - margin) > 1e-9:
        assert (b.pvalue < alpha) == (b.lower > margin)
    r = rate_sequence(xb, xb + eb, alpha, side="upper", null=0.9)
    if abs(r.upper - 0.9) > 1e-9:
        assert (r.pvalue < alpha) == (r.upper < 0.9)
    two = rate_sequence(xb, xb + eb, alpha, null=0.5)
    if min(abs(two.lower - 0.5), abs(two.upper - 0.5)) > 1e-9:
        assert (two.pvalue < alpha) == (not two.lower <= 0.5 <= two.upper)


def test_empty_arms_give_trivial_bounds_and_bad_counts_raise() -> None:
    assert rate_sequence(0, 0, 0.05) == rate_sequence(0, 0, 0.05)
    b = rate_sequence(0, 0, 0.05)
    assert (b.lower, b.upper, b.pvalue) == (0.0, 1.0, 1.0)
    d = difference_sequence(0, 0, 3, 10, 0.05)
    assert (d.lower, d.upper, d.pvalue) == (-1.0, 1.0, 1.0)
    for bad in ((5, 4), (-1, 4), (1, -1)):
        with pytest.raises(ValueError):
            rate_sequence(*bad, 0.05)
    with pytest.raises(ValueError):
        sequential_rho(0.6, one_sided=True)
    with pytest.raises(ValueError):
        sequential_rho(0.05, 0)


def _ever_outside(
    lower: np.ndarray, upper: np.ndarray, truth: float
) -> float:  # share of paths the truth ever leaves
    return float(((lower > truth) | (upper < truth)).any(axis=1).mean())


def test_time_uniform_coverage_of_a_rate_under_continuous_looks() -> None:
    """Monte Carlo: the truth leaves the sequence, at any of 500 looks, in ≤ α of paths."""
    rng = np.random.default_rng(7)
    paths, looks, p, alpha = 2000, np.arange(10, 5001, 10), 0.02, 0.05
    x = np.cumsum(rng.random((paths, looks[-1])) < p, axis=1)[:, looks - 1]
    _, lo, hi, _ = rate_bounds(x, looks, alpha)
    assert _ever_outside(lo, hi, p) <= alpha
    # the fixed-n z-interval looked at as often is wrong far more often (Armitage 1969)
    se = np.sqrt(p * (1 - p) / looks)
    naive = _ever_outside(x / looks - 1.96 * se, x / looks + 1.96 * se, p)
    assert naive > 3 * alpha


def test_time_uniform_coverage_of_a_canary_difference() -> None:
    """5 % → 25 % → 50 % allocation, one-sided lower bound of candidate − stable at 0."""
    rng = np.random.default_rng(11)
    paths, horizon, p, alpha = 1000, 20_000, 0.05, 0.05
    weight = np.where(
        np.arange(horizon) < 4000, 0.05, np.where(np.arange(horizon) < 10_000, 0.25, 0.5)
    )
    cand = rng.random((paths, horizon)) < weight
    err = rng.random((paths, horizon)) < p
    looks = np.arange(100, horizon + 1, 10) - 1
    n_c = np.cumsum(cand, axis=1)[:, looks]
    x_c = np.cumsum(cand & err, axis=1)[:, looks]
    x_s = np.cumsum(~cand & err, axis=1)[:, looks]
    n_s = looks[None, :] + 1 - n_c
    _, lo, _, _ = difference_bounds(x_s, n_s, x_c, n_c, alpha, side="lower")
    ever = float((lo > 0).any(axis=1).mean())
    assert ever <= alpha


def test_one_stratum_is_the_two_sample_sequence_and_strata_cancel_a_common_drift() -> None:
    one = stratified_difference_sequence([(50, 1000, 80, 900)], 0.05, side="lower")
    assert one == difference_sequence(50, 1000, 80, 900, 0.05, side="lower")
    # a rate of 1 % and then 5 % in both arms, the second arm 5 % and then 50 % of traffic
    strata = [(190, 19_000, 10, 1_000), (500, 10_000, 500, 10_000)]
    assert difference_sequence(690, 29_000, 510, 11_000, 0.05, side="lower").lower > 0
    both = stratified_difference_sequence(strata, 0.05, side="lower")
    assert both.estimate == pytest.approx(0.0, abs=1e-12) and both.lower < 0
    assert both.pvalue == 1.0
    assert stratified_difference_sequence([(0, 0, 3, 10)], 0.05).pvalue == 1.0  # no pairs


@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.integers(1, 20), st.integers(1, 20)),
        min_size=1,
        max_size=5,
    )
)
def test_strata_with_equal_rates_in_both_arms_show_no_difference(
    rows: list[tuple[int, int, int]],
) -> None:
    """Each stratum's arms at the same rate (events/n = k·x / k·n): the combined estimate
    is 0 and the one-sided tests in either direction reject nothing."""
    strata = [(x, 100, k * x, k * 100) for x, k, _ in rows]
    for side in ("lower", "upper"):
        b = stratified_difference_sequence(strata, 0.05, side=side)
        assert b.estimate == pytest.approx(0.0, abs=1e-12) and b.pvalue == 1.0
        assert b.lower <= 0.0 <= b.upper
