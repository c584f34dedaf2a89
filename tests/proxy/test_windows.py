"""Variant windows: wrap-around, counters, labels per row, request sizes, evidence."""

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
    seqs = [window.record(float(i), i % 3) for i in range(k)]
    assert seqs == list(range(k))
    ev = window.evidence()
    kept = min(k, size)
    # The recent latencies of what answered or timed out: model errors (1) are left out.
    recent = range(k - kept, k)
    assert ev.latencies.tolist() == [float(i) for i in recent if i % 3 != Outcome.MODEL_ERROR]
    assert window.summary()["window"] == kept
    assert ev.requests == k
    assert ev.errors == sum(1 for i in range(k) if i % 3)
    assert window.recorded == k


def test_labels_count_every_row_whenever_they_come() -> None:
    """Labels are scored against the predictions the request was answered with, a row
    each, however long after: the ring buffer's wrap does not matter any more."""
    window = VariantWindow("v1", 4)
    generation = window.generation
    for _ in range(100):
        window.record(0.01, Outcome.OK)  # the window wraps many times
    assert window.label(generation, (1.0, 0.0, 1.0), (1.0, 1.0, 1.0)) == (3, 2)
    assert window.label(generation, ("cat",), ("cat",)) == (1, 1)
    ev = window.evidence()
    assert (ev.labelled, ev.correct, ev.labelled_requests) == (4, 3, 2)
    assert ev.accuracy == 0.75


def test_regression_tolerance() -> None:
    window = VariantWindow("v1", 10, tol=0.5)
    assert window.label(window.generation, (10.0,), (10.4,)) == (1, 1)
    assert window.label(window.generation, (10.0,), (11.0,)) == (1, 0)


def test_rows_without_a_prediction_are_not_counted() -> None:
    window = VariantWindow("v1", 10)
    assert window.label(window.generation, (math.nan, 1.0), (1.0, 1.0)) == (1, 1)
    assert window.label(window.generation, (math.nan,), (1.0,)) == (0, 0)
    ev = window.evidence()
    assert (ev.labelled, ev.labelled_requests) == (1, 1)


def test_reset_zeroes_counters_keeps_samples_and_old_labels_do_not_count() -> None:
    window = VariantWindow("v1", 10)
    old = window.record(0.02, Outcome.TIMEOUT)
    before = window.generation
    window.count_routed()
    window.record_comparison(True)
    window.reset()
    assert window.generation != before
    assert window.label(before, (1.0,), (1.0,)) == (1, 1)  # scored, not counted
    ev = window.evidence()
    assert (ev.requests, ev.errors, ev.labelled, ev.compared) == (0, 0, 0, 0)
    assert ev.routed == 1  # only reset_routed() clears it
    assert ev.latencies.tolist() == [0.02]
    window.reset_routed()
    assert window.routed == 0
    new = window.record(0.01, Outcome.OK)
    assert new == old + 1  # sequence numbers survive a reset
    assert (window.requests, window.errors) == (1, 0)
    assert VariantWindow("v1", 10).generation not in (before, window.generation)


def test_latency_threshold_counts_from_when_it_is_set() -> None:
    window = VariantWindow("v1", 100)
    window.record(9.0, Outcome.OK)
    window.set_latency_threshold(0.1)
    for latency in (0.05, 0.2, 0.1, 0.3):
        window.record(latency, Outcome.OK)
    ev = window.evidence()
    assert (ev.latency_threshold, ev.since_threshold, ev.over_threshold) == (0.1, 4, 2)
    window.set_latency_threshold(None)
    window.record(5.0, Outcome.OK)
    ev = window.evidence()
    assert (ev.latency_threshold, ev.since_threshold, ev.over_threshold) == (None, 0, 0)


def test_comparisons_and_routed() -> None:
    window = VariantWindow("v1", 10)
    for agreed in (True, True, False, True):
        window.record_comparison(agreed)
    window.record_comparison(3, 4)  # a batch of 4 rows, 3 of them the same
    for _ in range(3):
        window.count_routed()
    ev = window.evidence()
    assert (ev.compared, ev.agreed, ev.agreement, ev.routed) == (8, 6, 0.75, 3)


def test_evidence_is_a_copy() -> None:
    window = VariantWindow("v1", 3)
    window.record(0.1, Outcome.OK)
    ev = window.evidence()
    window.record(0.2, Outcome.OK)
    assert ev.latencies.tolist() == [0.1]
    assert ev.requests == 1
    assert ev.inputs is None
    assert ev.version == "v1"


def test_inputs_kept_in_order_and_only_where_recorded() -> None:
    window = VariantWindow("v1", 3, input_width=2)
    for i in range(5):
        row = np.array([i, -i], dtype=np.float64) if i != 3 else None
        window.record(0.01, Outcome.OK, row=row)
    ev = window.evidence()
    assert ev.inputs is not None
    assert ev.inputs.dtype == np.float32
    assert ev.inputs.tolist() == [[2.0, -2.0], [4.0, -4.0]]
    with pytest.raises(ValueError):
        window.record(0.01, Outcome.OK, row=np.zeros(3))


@given(
    outcomes=st.lists(st.sampled_from(list(Outcome)), max_size=60),
    latencies=st.lists(st.floats(0.0, 10.0), min_size=60, max_size=60),
)
def test_model_errors_never_count_against_the_latency_threshold(
    outcomes: list[Outcome], latencies: list[float]
) -> None:
    """A model error says how fast a version fails, not how fast it answers: it is in
    the error counts only. A timeout is an answer too late: it counts as slow."""
    window = VariantWindow("v1", 1000)
    window.set_latency_threshold(0.5)
    for outcome, latency in zip(outcomes, latencies, strict=False):
        window.record(latency, outcome)
    ev = window.evidence()
    timed = [(o, t) for o, t in zip(outcomes, latencies, strict=False) if o != Outcome.MODEL_ERROR]
    assert ev.since_threshold == len(timed)
    assert ev.over_threshold == sum(1 for _, t in timed if t > 0.5)
    assert ev.latencies.tolist() == [t for _, t in timed]
    assert ev.errors == sum(1 for o in outcomes if o != Outcome.OK)
    (stratum,) = ev.strata or ((0.0, 0, 0, 0, 0, 0, 0),)
    assert stratum[3:5] == (len(timed), ev.over_threshold)


def test_summary() -> None:
    window = VariantWindow("v1", 1000)
    assert window.summary()["latency_p99"] is None
    for i in range(1, 101):
        window.record(i / 1000, Outcome.MODEL_ERROR if i <= 5 else Outcome.OK)
    window.label(window.generation, (1.0,), (1.0,))
    summary = window.summary()
    assert summary["requests"] == 100
    assert summary["error_rate"] == pytest.approx(0.05)
    # The percentiles are of the answers; the five model errors are reported on their own.
    answered = np.arange(6, 101) / 1000
    assert summary["latency_p50"] == pytest.approx(np.percentile(answered, 50))
    assert summary["latency_p99"] == pytest.approx(np.percentile(answered, 99))
    assert summary["error_latency_p99"] == pytest.approx(np.percentile(np.arange(1, 6) / 1000, 99))
    assert summary["window"] == 100
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
        window.record(latency, Outcome.OK, rows=rows)
    ev = window.evidence()
    assert (ev.since_threshold, ev.over_threshold, ev.latency_rows) == (3, 2, 4)
    assert ev.rows.tolist() == [1, 4, 2000, 5000, 1]  # an empty batch counts as one row
    assert ev.percentile(100, rows=4) == 0.3  # the 2000-row request is left out
    window.set_latency_threshold(0.1)  # no size given: every request counts
    window.record(5.0, Outcome.OK, rows=2000)
    assert (window.evidence().since_threshold, window.evidence().latency_rows) == (1, None)


def test_summary_reports_latency_per_row() -> None:
    window = VariantWindow("v1", 10)
    window.record(0.002, Outcome.OK, rows=1)
    window.record(0.2, Outcome.OK, rows=1000)
    summary = window.summary()
    assert summary["latency_per_row_p50"] == pytest.approx((0.002 + 0.0002) / 2)
    assert summary["rows_p50"] == 500.5
