"""The conditional test's batched arithmetic against the one-look-at-a-time definition:
`log_evalues` and `ratio_bounds` must give the very same floats as the code they replace
(the decisions and the audit log's numbers are not allowed to move by one ulp)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollguard.policy.conditional import (
    HARM_GRID,
    SAFE_GRID,
    Stratum,
    log_evalue,
    log_evalues,
    ratio_bounds,
)


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = -np.logaddexp(0.0, -z)
    return out


def reference_log_evalue(strata: list[Stratum], r0: float, *, harm: bool = True) -> float:
    """log_evalue as it was written for one r0 (rollguard before the batched form)."""
    rows = [(s.share, s.candidate_events, s.stable_events) for s in strata]
    rows = [(w, c, s) for w, c, s in rows if w is not None and c + s > 0]
    if not rows:
        return 0.0
    arr = np.asarray(rows, dtype=np.float64)
    share, on_c, on_s = arr[:, 0], arr[:, 1], arr[:, 2]
    offset = np.log(share) - np.log1p(-share)
    grid = np.asarray(HARM_GRID if harm else SAFE_GRID, dtype=np.float64)
    theta0 = offset + math.log(r0)
    theta = theta0[None, :] + np.log(grid)[:, None]
    log_lr = on_c * (_log_sigmoid(theta) - _log_sigmoid(theta0)) + on_s * (
        _log_sigmoid(-theta) - _log_sigmoid(-theta0)
    )
    per_alternative = log_lr.sum(axis=1)
    top = float(per_alternative.max())
    return top + math.log(float(np.exp(per_alternative - top).sum()) / grid.size)


def reference_ratio_bounds(strata: list[Stratum], alpha: float) -> tuple[float, float]:
    """The bisection as it was written: one e-value at a time, 20 halvings."""
    target = math.log(1.0 / alpha)

    def edge(harm: bool) -> float:
        lo, hi = math.log(1e-3), math.log(1e4)
        rejects_lo = reference_log_evalue(strata, math.exp(lo), harm=harm) >= target
        rejects_hi = reference_log_evalue(strata, math.exp(hi), harm=harm) >= target
        if harm and not rejects_lo:
            return 0.0
        if not harm and not rejects_hi:
            return math.inf
        if harm and rejects_hi:
            return math.exp(hi)
        if not harm and rejects_lo:
            return math.exp(lo)
        for _ in range(20):
            mid = (lo + hi) / 2
            if (reference_log_evalue(strata, math.exp(mid), harm=harm) >= target) == harm:
                lo = mid
            else:
                hi = mid
        return math.exp(lo if harm else hi)

    return edge(True), edge(False)


strata_lists = st.lists(
    st.builds(
        Stratum,
        st.integers(0, 400),
        st.integers(0, 100_000),
        st.integers(0, 400),
        st.integers(0, 100_000),
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(
    strata=strata_lists,
    nulls=st.lists(st.floats(1e-3, 1e4), min_size=1, max_size=40),
    harm=st.booleans(),
)
def test_many_nulls_at_once_give_the_same_floats_as_one_at_a_time(
    strata: list[Stratum], nulls: list[float], harm: bool
) -> None:
    expected = [reference_log_evalue(strata, r0, harm=harm) for r0 in nulls]
    assert log_evalues(strata, harm=harm)(nulls) == expected
    assert [log_evalue(strata, r0, harm=harm) for r0 in nulls] == expected


@settings(max_examples=300, deadline=None)
@given(strata=strata_lists, alpha=st.sampled_from([0.05, 0.05 / 3, 0.0125, 0.001]))
def test_the_bounds_are_the_same_floats_as_the_bisection_one_look_at_a_time(
    strata: list[Stratum], alpha: float
) -> None:
    assert ratio_bounds(strata, alpha) == reference_ratio_bounds(strata, alpha)


def test_the_bounds_of_typical_counts_are_the_same_floats() -> None:
    """Counts like a rollout's (a few strata of a ramp, units at the configured shares),
    where both edges are found by bisection rather than at the ends."""
    rng = np.random.default_rng(7)
    bisected = 0
    for _ in range(300):
        strata = [
            Stratum(int(rng.integers(0, 60)), 100 * (100 - w), int(rng.integers(0, 60)), 100 * w)
            for w in rng.choice([1, 5, 10, 25, 50], size=int(rng.integers(1, 4)), replace=False)
        ]
        bounds = ratio_bounds(strata, 0.05 / 3)
        assert bounds == reference_ratio_bounds(strata, 0.05 / 3)
        bisected += bounds[0] > 0 and math.isfinite(bounds[1])
    assert bisected > 100


def test_a_bad_null_is_refused_before_any_arithmetic() -> None:
    for evalues in (log_evalues([]), log_evalues([Stratum(3, 100, 4, 100)])):
        for bad in (0.0, -1.0, math.inf, math.nan):
            with pytest.raises(ValueError, match="null ratio"):
                evalues([1.0, bad])
