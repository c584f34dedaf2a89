"""The evidence's own arithmetic: its percentile is numpy's, to the last bit."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rollguard.policy.evidence import VariantEvidence, percentile

QS = st.one_of(st.sampled_from([0.0, 50.0, 90.0, 95.0, 99.0, 99.9, 100.0]), st.floats(0, 100))


def _same(got: float, expected: float) -> bool:
    return (math.isnan(got) and math.isnan(expected)) or got == expected


@settings(max_examples=500, deadline=None)
@given(
    values=hnp.arrays(
        np.float64,
        st.integers(1, 400),
        elements=st.floats(0, 30, allow_nan=False, allow_infinity=False),
    ),
    q=QS,
)
def test_the_percentile_is_numpys(values: np.ndarray, q: float) -> None:
    expected = float(np.percentile(values, q))
    assert _same(percentile(values, q), expected)
    assert values.flags.writeable  # the caller's array is left as it was
    assert _same(percentile(values.copy(), q), expected)


@settings(max_examples=300, deadline=None)
@given(values=hnp.arrays(np.float64, st.integers(1, 50)), q=QS)
def test_the_percentile_is_numpys_for_any_floats(values: np.ndarray, q: float) -> None:
    with np.errstate(invalid="ignore"):
        expected = float(np.percentile(values, q))
    assert _same(percentile(values, q), expected)


def test_a_window_percentile_counts_requests_up_to_the_rows_given() -> None:
    latencies = np.array([0.01, 0.02, 0.5, 0.03])
    rows = np.array([1, 1, 64, 2], dtype=np.uint32)
    evidence = VariantEvidence("1.0.0", latencies=latencies, rows=rows)
    assert evidence.percentile(50, 2) == float(np.percentile(latencies[rows <= 2], 50))
    assert evidence.percentile(99) == float(np.percentile(latencies, 99))
    assert VariantEvidence("1.0.0").percentile(99) is None
