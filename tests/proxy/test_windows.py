"""Variant windows: wrap-around, counters, feedback safety, request sizes, evidence."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollguard.proxy.windows import Outcome, VariantWindow


@given(size=st.integers(1, 50), k=st.integers(0, 200))
def test_window_holds_the_last_size_records_in_order(size: int, k: int) -> None:
    window = VariantWindow("v1", size)
    seqs = [window.record(float(i), i % 3, float(i)) for i in range(k)]
    assert seqs == list(range(k))
    ev = window.evidence()
    kept = min(k, size)
    assert ev.latencies.tolist() == [float(i) for i in range(k - kept, k)]
    assert ev.requests == k
    assert ev.errors == sum(1 for i in range(k) if i % 3)
    assert window.recorded == k


@given(size=st.integers(1, 20), k=st.integers(1, 80), data=st.data())
def test_feedback_only_lands_on_records_still_in_the_window(
    size: int, k: int, data: st.DataObject
) -> None:
    window = VariantWindow("v1", size)
    for i in range(k):
        window.record(0.01, Outcome.OK, float(i % 2))
    seq = data.draw(st.integers(0, k - 1))
    result = window.feedback(seq, float(seq % 2))
    ev = window.evidence()
    if seq < k - size:  # overwritten: nothing counted
        assert result is None
        assert (ev.labelled, ev.correct) == (0, 0)
    else:
        assert result is True
        assert (ev.labelled, ev.correct) == (1, 1)


def test_feedback_counts_correct_and_wrong_and_only_once() -> None:
    window = VariantWindow("v1", 10)
    a = window.record(0.01, Outcome.OK, 1.0)
    b = window.record(0.01, Outcome.OK, 0.0)
    assert window.feedback(a, 1.0) is True
    assert window.feedback(b, 1.0) is False
    assert window.feedback(a, 1.0) is None  # one label per request
    assert window.feedback(99, 1.0) is None  # never recorded
    assert window.feedback(-1, 1.0) is None
    ev = window.evidence()
    assert (ev.labelled, ev.correct, ev.accuracy) == (2, 1, 0.5)


def test_feedback_on_overwritten_slot_returns_none() -> None:
    window = VariantWindow("v1", 4)
    first = window.record(0.01, Outcome.OK, 1.0)
    for _ in range(4):
        window.record(0.01, Outcome.OK, 1.0)  # the fifth record reuses slot 0
    assert window.feedback(first, 1.0) is None
    assert window.evidence().labelled == 0


def test_regression_tolerance() -> None:
    window = VariantWindow("v1", 10, tol=0.5)
    seq = window.record(0.01, Outcome.OK, 10.0)
    assert window.feedback(seq, 10.4) is True
    seq = window.record(0.01, Outcome.OK, 10.0)
    assert window.feedback(seq, 11.0) is False


def test_feedback_on_a_failed_request_is_accepted_but_not_counted() -> None:
    window = VariantWindow("v1", 10)
    seq = window.record(0.5, Outcome.TIMEOUT, math.nan)
    assert window.feedback(seq, 1.0) is False
    assert window.evidence().labelled == 0


def test_reset_zeroes_counters_keeps_samples_and_old_labels_do_not_count() -> None:
    window = VariantWindow("v1", 10)
    old = window.record(0.02, Outcome.MODEL_ERROR, 1.0)
    window.count_routed()
    window.record_comparison(True)
    window.reset()
    assert window.feedback(old, 1.0) is True
    ev = window.evidence()
    assert (ev.requests, ev.errors, ev.labelled, ev.compared) == (0, 0, 0, 0)
    assert ev.routed == 1  # only reset_routed() clears it
    assert ev.latencies.tolist() == [0.02]
    window.reset_routed()
    assert window.routed == 0
    new = window.record(0.01, Outcome.OK, 1.0)
    assert new == old + 1  # sequence numbers survive a reset
    assert (window.requests, window.errors) == (1, 0)


def test_latency_threshold_counts_from_when_it_is_set() -> None:
    window = VariantWindow("v1", 100)
    window.record(9.0, Outcome.OK, 0.0)
    window.set_latency_threshold(0.1)
    for latency in (0.05, 0.2, 0.1, 0.3):
        window.record(latency, Outcome.OK, 0.0)
    ev = window.evidence()
    assert (ev.latency_threshold, ev.since_threshold, ev.over_threshold) == (0.1, 4, 2)
    window.set_latency_threshold(None)
    window.record(5.0, Outcome.OK, 0.0)
    ev = window.evidence()
    assert (ev.latency_threshold, ev.since_threshold, ev.over_threshold) == (None, 0, 0)


def test_comparisons_and_routed() -> None:
    window = VariantWindow("v1", 10)
    for agreed in (True, True, False, True):
        window.record_comparison(agreed)
    for _ in range(3):
        window.count_routed()
    ev = window.evidence()
    assert (ev.compared, ev.agreed, ev.agreement, ev.routed) == (4, 3, 0.75, 3)


def test_evidence_is_a_copy() -> None:
    window = VariantWindow("v1", 3)
    window.record(0.1, Outcome.OK, 1.0)
    ev = window.evidence()
    window.record(0.2, Outcome.OK, 1.0)
    assert ev.latencies.tolist() == [0.1]
    assert ev.requests == 1
    assert ev.inputs is None
    assert ev.version == "v1"


def test_inputs_kept_in_order_and_only_where_recorded() -> None:
    window = VariantWindow("v1", 3, input_width=2)
    for i in range(5):
        row = np.array([i, -i], dtype=np.float64) if i != 3 else None
        window.record(0.01, Outcome.OK, 0.0, row)
    ev = window.evidence()
    assert ev.inputs is not None
    assert ev.inputs.dtype == np.float32
    assert ev.inputs.tolist() == [[2.0, -2.0], [4.0, -4.0]]
    with pytest.raises(ValueError):
        window.record(0.01, Outcome.OK, 0.0, np.zeros(3))


def test_summary() -> None:
    window = VariantWindow("v1", 1000)
    assert window.summary()["latency_p99"] is None
    for i in range(1, 101):
        window.record(i / 1000, Outcome.MODEL_ERROR if i <= 5 else Outcome.OK, 1.0)
    window.feedback(50, 1.0)
    summary = window.summary()
    assert summary["requests"] == 100
    assert summary["error_rate"] == pytest.approx(0.05)
    assert summary["latency_p50"] == pytest.approx(np.percentile(np.arange(1, 101) / 1000, 50))
    assert summary["latency_p99"] == pytest.approx(0.09901)
    assert summary["accuracy"] == 1.0
    assert summary["agreement"] is None


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((0,), {}), ((10,), {"input_width": 0}), ((10,), {"tol": -1.0})],
)
def test_bad_window_arguments(args: tuple[int], kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        VariantWindow("v1", *args, **kwargs)  # type: ignore[arg-type]


def test_latency_threshold_counts_only_requests_up_to_its_size() -> None:
    window = VariantWindow("v1", 100)
    window.set_latency_threshold(0.1, rows=4)
    for latency, rows in ((0.05, 1), (0.2, 4), (5.0, 2000), (0.01, 5000), (0.3, 0)):
        window.record(latency, Outcome.OK, 0.0, rows=rows)
    ev = window.evidence()
    assert (ev.since_threshold, ev.over_threshold, ev.latency_rows) == (3, 2, 4)
    assert ev.rows.tolist() == [1, 4, 2000, 5000, 1]  # an empty batch counts as one row
    assert ev.percentile(100, rows=4) == 0.3  # the 2000-row request is left out
    window.set_latency_threshold(0.1)  # no size given: every request counts
    window.record(5.0, Outcome.OK, 0.0, rows=2000)
    assert (window.evidence().since_threshold, window.evidence().latency_rows) == (1, None)


def test_summary_reports_latency_per_row() -> None:
    window = VariantWindow("v1", 10)
    window.record(0.002, Outcome.OK, 0.0, rows=1)
    window.record(0.2, Outcome.OK, 0.0, rows=1000)
    summary = window.summary()
    assert summary["latency_per_row_p50"] == pytest.approx((0.002 + 0.0002) / 2)
    assert summary["rows_p50"] == 500.5
