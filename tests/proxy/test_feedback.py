"""The feedback index: which recorded request a label may reach."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollguard.proxy.feedback import FeedbackIndex
from rollguard.proxy.windows import Outcome, VariantWindow


def test_round_trip_and_eviction() -> None:
    window = VariantWindow("v1", 100)
    index = FeedbackIndex(3)
    for i in range(5):
        assert index.put("m", None, f"r{i}", window, window.record(0.01, Outcome.OK, 1.0))
    assert len(index) == 3
    assert index.pop("m", None, "r0") is None  # evicted, oldest first
    assert index.pop("m", None, "r1") is None
    assert index.pop("m", None, "r2") == (window, 2)
    assert index.pop("m", None, "r2") is None  # taken once
    assert index.pop("m", None, "nope") is None


def test_a_label_reaches_only_its_model_and_its_client() -> None:
    window = VariantWindow("v1", 100)
    index = FeedbackIndex(10)
    index.put("fraud", "key:app", "r1", window, window.record(0.01, Outcome.OK, 1.0))
    index.put("fraud", None, "r2", window, window.record(0.01, Outcome.OK, 1.0))
    assert index.pop("digits", "key:app", "r1") is None  # another model's id
    assert index.pop("fraud", "key:mallory", "r1") is None  # another client's
    assert index.pop("fraud", None, "r1") is None  # no credential is not the client either
    assert index.pop("fraud", "key:app", "r2") is None  # a request made without one
    assert index.pop("fraud", "key:app", "r1") == (window, 0)
    assert index.pop("fraud", None, "r2") == (window, 1)


def test_a_repeated_id_never_takes_over_an_entry_that_can_still_be_labelled() -> None:
    window = VariantWindow("v1", 4)
    index = FeedbackIndex(10)
    first = window.record(0.01, Outcome.OK, 1.0)
    assert index.put("m", None, "same", window, first)
    assert not index.put("m", None, "same", window, window.record(0.01, Outcome.OK, 0.0))
    assert index.pop("m", None, "same") == (window, first)
    # Once the first is labelled, or has left its window, the id is free again.
    later = window.record(0.01, Outcome.OK, 1.0)
    assert index.put("m", None, "same", window, later)
    for _ in range(4):
        window.record(0.01, Outcome.OK, 1.0)  # `later` leaves the window of 4
    newest = window.record(0.01, Outcome.OK, 1.0)
    assert index.put("m", None, "same", window, newest)
    assert index.pop("m", None, "same") == (window, newest)


@given(capacity=st.integers(1, 10), ids=st.lists(st.integers(0, 15), max_size=60))
def test_matches_a_model_of_first_puts_within_capacity(capacity: int, ids: list[int]) -> None:
    """With every record still labellable, an id maps to the first of its puts, and is
    known while that put is among the last `capacity` entries taken."""
    window = VariantWindow("v1", 1000)
    index = FeedbackIndex(capacity)
    taken: list[tuple[str, int]] = []  # (id, seq) of each put that took an entry
    for seq, rid in enumerate(ids):
        window.record(0.01, Outcome.OK, 1.0)
        live = {key for key, _ in taken[-capacity:]}
        took = index.put("m", None, str(rid), window, seq)
        assert took == (str(rid) not in live)
        if took:
            taken.append((str(rid), seq))
    expected = dict(taken[-capacity:])
    assert len(index) == len(expected)
    for rid in range(16):
        got = index.pop("m", None, str(rid))
        assert got == ((window, expected[str(rid)]) if str(rid) in expected else None)


def test_rejects_zero_capacity() -> None:
    with pytest.raises(ValueError, match="capacity"):
        FeedbackIndex(0)
