"""proxy/capacity.py's bookkeeping: caps never exceeded, everything given back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rollguard.proxy.capacity import Capacity, Refusal

_CLIENTS = st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"])
_STEPS = st.lists(st.tuples(st.booleans(), _CLIENTS), max_size=200)


@given(_STEPS, st.integers(1, 20), st.integers(0, 8))
def test_connection_caps_hold_and_counts_return_to_zero(
    steps: list[tuple[bool, str]], total: int, per_client: int
) -> None:
    capacity = Capacity(total, per_client, max_buffered_bytes=1024, max_inflight=1)
    open_: list[str] = []
    refused = 0
    for opening, client in steps:
        if opening:
            refusal = capacity.connect(client)
            refused += refusal is not None
            if refusal is None:
                open_.append(client)
            elif refusal is Refusal.MAX_CONNECTIONS:
                assert len(open_) == total
            else:
                assert per_client and open_.count(client) == per_client
        elif client in open_:
            open_.remove(client)
            capacity.disconnect(client)
        assert capacity.connections == len(open_) <= total
        assert capacity.client_connections(client) == open_.count(client)
        assert not per_client or open_.count(client) <= per_client
    for client in open_:
        capacity.disconnect(client)
    assert capacity.connections == 0
    assert sum(capacity.refused.values()) == refused


@given(st.lists(st.tuples(st.sampled_from(["admit", "grow", "arrive", "answer"]),
                          st.integers(0, 600)), max_size=100),
       st.integers(1, 4))  # fmt: skip
def test_body_budget_never_overdrawn_and_fully_released(
    steps: list[tuple[str, int]], max_inflight: int
) -> None:
    inflight = [0]
    capacity = Capacity(10, 0, max_buffered_bytes=1000, max_inflight=max_inflight,
                        inflight=lambda: inflight[0])  # fmt: skip
    arriving: list[int] = []  # bytes reserved per body still arriving
    answering: list[int] = []  # per request handed over, until answered
    for op, n in steps:
        if op == "admit":
            if capacity.admit_body(n) is None:
                arriving.append(n)
        elif op == "grow" and arriving:
            if capacity.grow(n) is None:
                arriving[-1] += n
        elif op == "arrive" and arriving:
            capacity.received()
            answering.append(arriving.pop())
            inflight[0] += 1
        elif op == "answer" and answering:
            capacity.release(answering.pop(0))
            inflight[0] -= 1
        assert capacity.buffered == sum(arriving) + sum(answering) <= 1000
        assert capacity.receiving == len(arriving)
        assert capacity.receiving + inflight[0] <= max(max_inflight, inflight[0])
    for reserved in arriving:
        capacity.received()
        capacity.release(reserved)
    for reserved in answering:
        capacity.release(reserved)
    assert (capacity.buffered, capacity.receiving) == (0, 0)
