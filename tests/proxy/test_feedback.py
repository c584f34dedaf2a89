"""The feedback index: which recorded request a label may reach, and its bounds."""

from __future__ import annotations

import gc
import random
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollguard.proxy.feedback import FeedbackIndex, Missing
from rollguard.proxy.windows import Outcome, VariantWindow

HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_round_trip_and_eviction_by_rows() -> None:
    window = VariantWindow("v1", 10)
    index = FeedbackIndex(3, HOUR)
    for i in range(5):
        assert index.put("m", None, f"r{i}", window, (1.0,))
    assert (len(index), index.rows) == (3, 3)
    assert index.take("m", None, "r0") is Missing.EXPIRED  # forgotten, oldest first
    assert index.take("m", None, "r1") is Missing.EXPIRED
    assert index.take("m", None, "r2") == (window, window.generation, (1.0,), 0.0)
    assert index.take("m", None, "r2") is Missing.UNKNOWN  # taken once
    assert index.take("m", None, "nope") is Missing.UNKNOWN


def test_a_batch_takes_its_rows_and_one_larger_than_the_index_is_not_kept() -> None:
    window = VariantWindow("v1", 10)
    index = FeedbackIndex(4, HOUR)
    assert index.put("m", None, "one", window, (1.0,))
    assert index.put("m", None, "three", window, (1.0, 0.0, "cat"))
    assert index.rows == 4
    assert index.put("m", None, "two", window, (0.0, 0.0))  # the two oldest entries go
    assert index.take("m", None, "one") is Missing.EXPIRED
    assert index.take("m", None, "three") is Missing.EXPIRED
    assert not index.put("m", None, "five", window, (0.0,) * 5)
    assert not index.put("m", None, "empty", window, ())
    assert index.take("m", None, "two") == (window, window.generation, (0.0, 0.0), 0.0)


def test_entries_expire_by_age() -> None:
    clock = Clock()
    window = VariantWindow("v1", 10)
    index = FeedbackIndex(100, 60.0, clock=clock)
    index.put("m", None, "old", window, (1.0,))
    clock.now = 30.0
    index.put("m", None, "young", window, (1.0,))
    clock.now = 60.0
    assert index.take("m", None, "old") is Missing.EXPIRED  # exactly max_age: gone
    assert index.take("m", None, "young") == (window, window.generation, (1.0,), 0.0)
    clock.now = 1000.0
    index.put("m", None, "late", window, (1.0,))
    assert (len(index), index.rows) == (1, 1)


def test_a_label_reaches_only_its_model_and_its_client() -> None:
    window = VariantWindow("v1", 100)
    index = FeedbackIndex(10, HOUR)
    index.put("fraud", "key:app", "r1", window, (1.0,))
    index.put("fraud", None, "r2", window, (1.0,))
    assert index.take("digits", "key:app", "r1") is Missing.UNKNOWN  # another model's id
    assert index.take("fraud", "key:mallory", "r1") is Missing.UNKNOWN  # another client's
    assert index.take("fraud", None, "r1") is Missing.UNKNOWN  # no credential: not the client
    assert index.take("fraud", "key:app", "r2") is Missing.UNKNOWN  # made without one
    assert index.take("fraud", "key:app", "r1") == (window, window.generation, (1.0,), 0.0)
    assert index.take("fraud", None, "r2") == (window, window.generation, (1.0,), 0.0)


def test_a_repeated_id_never_takes_over_an_entry_that_can_still_be_labelled() -> None:
    window = VariantWindow("v1", 4)
    index = FeedbackIndex(3, HOUR)
    assert index.put("m", None, "same", window, (1.0,))
    assert not index.put("m", None, "same", window, (0.0,))
    assert index.take("m", None, "same") == (window, window.generation, (1.0,), 0.0)
    # Once the first is labelled, or has been forgotten, the id is free again.
    assert index.put("m", None, "same", window, (2.0,))
    for i in range(3):
        index.put("m", None, f"other{i}", window, (1.0,))  # "same" is forgotten
    assert index.find("m", None, "same") is Missing.EXPIRED
    assert index.put("m", None, "same", window, (3.0,))
    assert index.take("m", None, "same") == (window, window.generation, (3.0,), 0.0)


def test_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="capacity"):
        FeedbackIndex(0, HOUR)
    with pytest.raises(ValueError, match="max_age_s"):
        FeedbackIndex(10, 0.0)


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 11), st.integers(1, 4)),
        st.tuples(st.just("take"), st.integers(0, 11), st.just(0)),
        st.tuples(st.just("wait"), st.integers(0, 40), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=400)
@given(capacity=st.integers(1, 8), max_age=st.integers(1, 60), ops=_OPS)
def test_matches_a_model_of_the_bounds(
    capacity: int, max_age: int, ops: list[tuple[str, int, int]]
) -> None:
    """Against a plain list model: an id maps to its first live put; the index holds the
    newest requests that fit `capacity` rows (labelled or not) and are younger than
    `max_age`; a label for an id forgotten unlabelled is EXPIRED while it is among the
    `capacity` latest forgotten (it may be up to 2 × `capacity`), one never forgotten
    (never put, or labelled since) UNKNOWN; memory stays bounded."""
    clock = Clock()
    window = VariantWindow("v1", 4)
    index = FeedbackIndex(capacity, float(max_age), clock=clock)
    held: list[tuple[str, int, float, bool]] = []  # (id, rows, put at, labelled), oldest first
    buried: list[str] = []  # ids forgotten unlabelled, least recently forgotten first
    value = 0.0

    def live() -> dict[str, int]:
        return {k: r for k, r, _, labelled in held if not labelled}

    def expire() -> None:
        while held and (
            sum(r for _, r, _, _ in held) > capacity or held[0][2] <= clock.now - max_age
        ):
            key, _, _, labelled = held.pop(0)
            if not labelled and key not in live():
                if key in buried:
                    buried.remove(key)
                buried.append(key)
                del buried[: -2 * capacity]

    for op, rid, rows in ops:
        key = str(rid)
        if op == "wait":
            clock.now += rid
            continue
        expire()
        if op == "put":
            value += 1.0
            took = index.put("m", None, key, window, (value,) * rows)
            assert took == (rows <= capacity and key not in live())
            if took:
                held.append((key, rows, clock.now, False))
                expire()
        else:
            got = index.take("m", None, key)
            if key in live():
                assert not isinstance(got, Missing) and len(got[2]) == live()[key]
                held = [(k, r, t, labelled or k == key) for k, r, t, labelled in held]
                if key in buried:
                    buried.remove(key)
            elif key in buried[-capacity:]:
                assert got is Missing.EXPIRED
            elif key not in buried:
                assert got is Missing.UNKNOWN
        assert index.rows == sum(r for _, r, _, _ in held) <= capacity
        assert len(index) == len(live()) and index.held == len(held)
        assert index.tombstones <= 2 * capacity


def test_the_issues_delayed_labels_count_for_both_arms() -> None:
    """Issue 16, problem 5, with the real classes: a 5 % split, 2,000-slot windows, every
    request labelled 5,000 requests later. The ring-buffer attribution kept none of the
    stable's labels; the index keeps every label of both arms."""
    rng = random.Random(7)
    windows = {v: VariantWindow(v, 2000) for v in ("stable", "candidate")}
    index = FeedbackIndex(100_000, HOUR)
    arms: list[str] = []
    delay, n = 5000, 30_000
    for i in range(n):
        arm = "candidate" if rng.random() < 0.05 else "stable"
        arms.append(arm)
        windows[arm].record(0.01, Outcome.OK)
        assert index.put("m", None, str(i), windows[arm], (float(i % 2),))
        if i >= delay:
            taken = index.take("m", None, str(i - delay))
            assert not isinstance(taken, Missing)
            window, generation, predictions, share = taken
            window.label(generation, predictions, (1.0,), share)
    for arm, window in windows.items():
        sent = arms[: n - delay].count(arm)
        assert window.evidence().labelled == window.evidence().labelled_requests == sent


def test_labels_count_in_the_weight_their_request_was_routed_at() -> None:
    """A label comes back after the weight moved on: it counts in the stratum of the
    weight its request was routed at (the accuracy test compares arms per weight)."""
    window = VariantWindow("v", 8)
    index = FeedbackIndex(100, HOUR)
    for rid, share in (("a", 5.0), ("b", 25.0)):
        window.record(0.01, Outcome.OK, share=share)
        assert index.put("m", None, rid, window, (1.0,), share)
    for rid, label in (("b", 1.0), ("a", 0.0)):  # late, in any order
        taken = index.take("m", None, rid)
        assert not isinstance(taken, Missing)
        owner, generation, predictions, share = taken
        owner.label(generation, predictions, (label,), share)
    ev = window.evidence()
    assert ev.label_strata == ((5.0, 1, 0), (25.0, 1, 1))
    assert (ev.labelled, ev.correct) == (2, 1)
    window.reset()
    assert window.evidence().label_strata == ()


def test_what_the_index_keeps_is_left_alone_by_the_collector() -> None:
    """A full index must not cost the cyclic collector: each full collection walking
    200,000 tuples stopped the event loop ~10 ms (the gateway's p99)."""
    window = VariantWindow("v1", 10)
    index = FeedbackIndex(1000, HOUR)
    for i in range(1000):
        index.put("m", "alice", f"r{i}", window, (float(i % 2), "cat"))
    # A tuple is untracked once a collection finds only untracked items in it; one pass
    # may look at an entry before its parts, so give it two.
    gc.collect()
    gc.collect()
    held = list(index._order)  # white-box: what the index holds per request
    assert len(held) == 500  # two rows each
    assert not any(gc.is_tracked(entry) or gc.is_tracked(entry[0]) for entry in held)
    assert index.take("m", "alice", "r999") == (window, window.generation, (1.0, "cat"), 0.0)


def test_a_window_no_request_names_is_let_go() -> None:
    index = FeedbackIndex(10, HOUR)
    old = VariantWindow("v1", 10)
    gone = weakref.ref(old)
    index.put("m", None, "a", old, (1.0,))
    del old
    new = VariantWindow("v2", 10)
    for i in range(25):  # every request that named the old window is dropped
        index.put("m", None, f"r{i}", new, (1.0,))
    gc.collect()
    assert gone() is None
    assert index.take("m", None, "r24") == (new, new.generation, (1.0,), 0.0)


@settings(max_examples=200)
@given(
    capacity=st.integers(1, 6),
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "take", "new window"]), st.integers(0, 9)), max_size=150
    ),
)
def test_a_label_reaches_the_window_its_request_was_put_with(
    capacity: int, ops: list[tuple[str, int]]
) -> None:
    """Windows come and go (a reload makes new ones) while the index numbers them and
    reuses the numbers of windows no request names any more: a take hands back the very
    window its request was put with, never one that took over its number."""
    index = FeedbackIndex(capacity, HOUR)
    windows = [VariantWindow("v0", 4)]
    put_with: dict[str, VariantWindow] = {}
    for op, n in ops:
        key = str(n)
        if op == "new window":
            windows.append(VariantWindow(f"v{len(windows)}", 4))
            del windows[:-3]  # the gateway holds on to a few; the rest go
        elif op == "put":
            window = windows[n % len(windows)]
            if index.put("m", None, key, window, (1.0,)):
                put_with[key] = window
        else:
            got = index.take("m", None, key)
            if not isinstance(got, Missing):
                assert got[0] is put_with[key]


def test_a_full_index_holds_a_request_in_about_300_bytes_besides_its_id() -> None:
    """Memory, not time (deterministic): 100,000 requests are most of a loaded gateway's
    RSS growth. 286 bytes a request measured here with 20,000 (309 with 100,000, where the
    dict's table is emptier), tombstones aside; 366 (389) when the deque held (key, kept)
    pairs and the window was named by a fresh `id()` int each put."""
    import tracemalloc

    window = VariantWindow("v1", 10)
    ids = [f"{i:032x}" for i in range(20_000)]
    index = FeedbackIndex(len(ids), HOUR)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, request_id in enumerate(ids):
            index.put("fraud", "", request_id, window, (float(i % 2),), 10.0)
        per_request = (tracemalloc.get_traced_memory()[0] - before) / len(ids)
    finally:
        tracemalloc.stop()
    assert index.held == len(ids)
    assert per_request < 340, per_request
