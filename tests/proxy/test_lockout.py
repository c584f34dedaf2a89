"""Failed admin credentials per client: the sliding window behind admin's 429 (pure logic)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rollguard.proxy.lockout import Lockout


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@given(
    st.lists(st.floats(0, 30, allow_nan=False), max_size=40),
    st.integers(1, 6),
    st.floats(1, 60, allow_nan=False),
)
def test_locked_out_exactly_while_limit_failures_are_in_the_window(
    gaps: list[float], limit: int, window: float
) -> None:
    clock = Clock()
    lockout = Lockout(limit=limit, window_s=window, clock=clock)
    times: list[float] = []
    for gap in gaps:
        clock.now += gap
        recent = [t for t in times if t > clock.now - window]
        wait = lockout.retry_after("c")
        assert (wait is None) is (len(recent) < limit)
        if wait is not None:
            assert 1 <= wait <= window + 1
            continue  # refused before any token is compared: not a failure
        lockout.failed("c")
        times.append(clock.now)


def test_clients_are_counted_apart_and_the_table_is_bounded() -> None:
    clock = Clock()
    lockout = Lockout(limit=2, window_s=60, max_clients=3, clock=clock)
    for _ in range(2):
        lockout.failed("a")
    assert lockout.retry_after("a") == 60 and lockout.retry_after("b") is None
    clock.now += 30
    assert lockout.retry_after("a") == 30
    for client in "bcde":
        lockout.failed(client)
    assert len(lockout) == 3
    assert lockout.retry_after("a") is None  # the oldest failing client was forgotten
    clock.now += 61
    assert lockout.retry_after("e") is None and len(lockout) == 2
