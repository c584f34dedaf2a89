"""One decider per rollout: the lease, its hand-over, and fencing of a stale decider."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from rollguard.proxy.fleet.errors import Fenced
from rollguard.proxy.fleet.lease import Lease
from rollguard.proxy.fleet.store import Fence, RedisStateStore
from tests.fleet.conftest import RedisServer
from tests.fleet.support import until
from tests.serving.support import eventually

LEASE_S = 0.6  # short, so a hand-over fits in a test; the default is 5 s


def _lease(client: aioredis.Redis, server: RedisServer, holder: str) -> Lease:
    return Lease(client, server.target, "shop", holder=holder, lease_s=LEASE_S)


async def test_of_two_contenders_one_wins(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    a, b = _lease(client, redis_server, "a"), _lease(client, redis_server, "b")
    won = await asyncio.gather(a.acquire(), b.acquire())
    assert sorted(won) == [False, True]
    winner, loser = (a, b) if won[0] else (b, a)
    assert winner.held and not loser.held and loser.other == winner.holder
    assert await loser.holder_now() == winner.holder
    with pytest.raises(Fenced, match="does not hold the lease"):
        loser.fence()
    assert await winner.renew() and not await loser.renew()
    await winner.release()
    assert await loser.acquire()


async def test_a_holder_that_stops_renewing_is_replaced_within_the_lease(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    a, b = _lease(client, redis_server, "a"), _lease(client, redis_server, "b")
    holders: dict[str, list[bool]] = {"a": [], "b": []}
    task_a = asyncio.create_task(a.campaign(holders["a"].append))
    await eventually(lambda: a.held, 5)
    task_b = asyncio.create_task(b.campaign(holders["b"].append))
    try:
        await asyncio.sleep(LEASE_S)  # b keeps trying while a renews: a keeps it
        assert a.held and not b.held and holders["b"] == []
        task_a.cancel()  # a killed process: no more renewals, no release
        killed = time.monotonic()
        await eventually(lambda: b.held, LEASE_S * 3)
        # Within the lease time (a's last renewal was before the kill), plus an allowance
        # for a loaded machine's scheduling; b retries just as the lease expires.
        assert time.monotonic() - killed < LEASE_S + 0.5
        assert holders["b"] == [True]
        assert await b.holder_now() == "b"
    finally:
        task_b.cancel()
        await asyncio.gather(task_a, task_b, return_exceptions=True)


async def test_a_stale_deciders_write_is_refused(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    store = RedisStateStore(client, redis_server.target)
    a, b = _lease(client, redis_server, "a"), _lease(client, redis_server, "b")
    assert await a.acquire()
    a.moved_to(await store.save("shop", {"step": 1}, fence=a.fence()))
    stale = a.fence()  # a pauses here (a GC pause, a partition) past its lease
    await eventually(lambda: not a.held, LEASE_S * 2)
    with pytest.raises(Fenced):
        a.fence()  # detected locally, before any write
    await until(b.acquire, LEASE_S * 3)
    assert b.version == 1  # the new decider starts from the state version it read
    b.moved_to(await store.save("shop", {"step": 2}, fence=b.fence()))
    with pytest.raises(Fenced, match="no longer holds the decider lease"):
        await store.save("shop", {"step": 9}, fence=stale)  # and refused by Redis
    with pytest.raises(Fenced, match="version 2, not 1"):
        await store.save("shop", {"step": 9}, fence=Fence(1))  # a lease-less stale write
    assert await store.load("shop") == {"step": 2}
    # The lease records the version its holder last wrote.
    raw = await client.get("rollguard:lease:shop")
    assert raw is not None and b'"version":2' in raw
