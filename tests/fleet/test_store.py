"""Rollout state in Redis: versioned, compare-and-set, sealed like a state file."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from rollguard.policy.errors import StateError
from rollguard.policy.keys import AuditKey
from rollguard.proxy.fleet.errors import Fenced
from rollguard.proxy.fleet.store import Fence, RedisStateStore
from tests.fleet.conftest import RedisServer

KEY = AuditKey(b"k" * 32)
STATE = {"phase": "progressing", "step": 1, "weight": 5.0, "approvals": [], "threshold": 0.25}


def _store(
    client: aioredis.Redis, server: RedisServer, key: AuditKey | None = None
) -> RedisStateStore:
    return RedisStateStore(client, server.target, key=key)


async def test_saved_state_reads_back_with_its_version(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    store = _store(client, redis_server, KEY)
    assert await store.read("shop") is None
    assert await store.version("shop") == 0
    assert await store.save("shop", STATE, audit_seq=7, fence=Fence(0)) == 1
    assert await store.save("shop", STATE | {"step": 2}, audit_seq=9, fence=Fence(1)) == 2
    stored = await store.read("shop")
    assert stored is not None
    assert (stored.state, stored.audit_seq, stored.version, stored.sealed) == (
        STATE | {"step": 2},
        9,
        2,
        "key",
    )
    assert await store.load("shop") == STATE | {"step": 2}
    assert await store.names() == ["shop"]


async def test_a_stale_writer_is_refused(client: aioredis.Redis, redis_server: RedisServer) -> None:
    a, b = _store(client, redis_server), _store(client, redis_server)
    await a.save("shop", STATE, fence=Fence(0))
    read_by_both = await a.version("shop")
    await a.save("shop", STATE | {"phase": "rolled_back"}, fence=Fence(read_by_both))
    with pytest.raises(Fenced, match="version 2, not 1"):
        await b.save("shop", STATE | {"step": 3}, fence=Fence(read_by_both))
    assert await b.load("shop") == STATE | {"phase": "rolled_back"}


async def test_a_deleted_state_keeps_its_version(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    store = _store(client, redis_server)
    await store.save("shop", STATE, fence=Fence(0))
    assert await store.delete("shop", fence=Fence(1)) == 2
    assert await store.read("shop") is None and await store.names() == []
    with pytest.raises(Fenced):  # a writer that last saw it empty cannot recreate it
        await store.save("shop", STATE, fence=Fence(0))
    assert await store.save("shop", STATE, fence=Fence(2)) == 3


async def test_state_changed_in_redis_is_refused(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    store = _store(client, redis_server, KEY)
    await store.save("shop", STATE, fence=Fence(0))
    await store.save("cart", STATE | {"step": 4}, fence=Fence(0))
    doc = await client.hget("rollguard:state:shop", "doc")
    assert isinstance(doc, bytes)
    await client.hset("rollguard:state:shop", "doc", doc.replace(b'"step":1', b'"step":3'))
    with pytest.raises(StateError, match="seal does not verify"):
        await store.read("shop")
    cart = await client.hget("rollguard:state:cart", "doc")
    assert cart is not None
    await client.hset("rollguard:state:shop", mapping={"doc": cart, "version": 1})
    with pytest.raises(StateError, match="state of 'cart', not 'shop'"):
        await store.read("shop")
    with pytest.raises(StateError, match="no key is configured"):
        await _store(client, redis_server).read("cart")
    # An old document put back under a newer version (a replay) does not pass either.
    await store.save("cart", STATE, fence=Fence(1))
    await client.hset("rollguard:state:cart", "doc", cart)
    with pytest.raises(StateError, match="version 1 under version"):
        await store.read("cart")


async def test_restore_writes_above_every_version_seen(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    store = _store(client, redis_server, KEY)
    for version in range(3):
        await store.save("shop", STATE | {"step": version}, audit_seq=version, fence=Fence(version))
    known = await store.read("shop")
    assert known is not None and known.version == 3
    await client.flushdb()  # Redis lost everything (restarted without persistence)
    assert await store.restore("shop", known, fence=Fence(0)) == 4
    again = await store.read("shop")
    assert again is not None and (again.state, again.audit_seq) == (known.state, known.audit_seq)
