"""Sample-ratio mismatch: GrowthBook's and scipy's reference values, and the alarm rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import chisquare

from policy.srm import SRM_MIN_PER_ARM, SRM_PVALUE, srm_alarm, srm_pvalue


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
