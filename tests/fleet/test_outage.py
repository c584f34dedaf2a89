"""Redis stopped mid-use: one exception type everywhere, the last state kept, and after
Redis returns the store reconciles from the state version."""

from __future__ import annotations

import signal

import pytest
import redis.asyncio as aioredis

from rollguard.policy.keys import AuditKey
from rollguard.policy.summary import VariantSummary
from rollguard.proxy.fleet.audit import RedisAuditLog
from rollguard.proxy.fleet.errors import FleetUnavailable
from rollguard.proxy.fleet.evidence import FleetEvidence
from rollguard.proxy.fleet.follow import StateFollower
from rollguard.proxy.fleet.lease import Lease
from rollguard.proxy.fleet.store import Fence, RedisStateStore, VersionedState
from tests.fleet.conftest import RedisServer
from tests.fleet.support import running
from tests.serving.support import eventually

KEY = AuditKey(b"o" * 32)
LEASE_S = 0.5


class Follows:
    def __init__(self) -> None:
        self.applied: list[tuple[str, int | None]] = []
        self.state: dict[str, object] | None = None

    def __call__(self, name: str, stored: VersionedState | None) -> None:
        self.applied.append((name, None if stored is None else stored.version))
        self.state = None if stored is None else stored.state


async def _every_call_fails_as_unavailable(
    store: RedisStateStore, lease: Lease, evidence: FleetEvidence, audit: RedisAuditLog
) -> None:
    calls = {
        "load": store.load("shop"),
        "save": store.save("shop", {"step": 9}, fence=Fence(2, lease.holder)),
        "names": store.names(),
        "acquire": lease.acquire(),
        "renew": lease.renew(),
        "publish": evidence.publish([VariantSummary("2", 1, requests=3)], interval_s=1),
        "gather": evidence.gather(),
        "append": audit.append("admin", "shop", "ops", {}),
        "verify": audit.verify(),
    }
    for what, call in calls.items():
        with pytest.raises(FleetUnavailable) as caught:
            await call
        assert str(caught.value).startswith("redis at redis://127.0.0.1:"), what


async def test_redis_stopped_and_restarted(redis_server: RedisServer) -> None:
    target = redis_server.target
    decider_client, follower_client = target.client(), target.client()
    try:
        store = RedisStateStore(decider_client, target, key=KEY)
        lease = Lease(decider_client, target, "shop", holder="decider", lease_s=LEASE_S)
        evidence = FleetEvidence(decider_client, target, "shop", "decider")
        audit = RedisAuditLog(decider_client, target, key=KEY)
        follows = Follows()
        follower = StateFollower(
            RedisStateStore(follower_client, target, key=KEY),
            follows,
            reread_s=0.1,
            resubscribe_s=0.1,
        )
        async with running(follower.run()):
            await _outage_and_return(redis_server, store, lease, evidence, audit, follower, follows)
    finally:
        await decider_client.aclose()
        await follower_client.aclose()


async def _outage_and_return(
    redis_server: RedisServer,
    store: RedisStateStore,
    lease: Lease,
    evidence: FleetEvidence,
    audit: RedisAuditLog,
    follower: StateFollower,
    follows: Follows,
) -> None:
    assert await lease.acquire()
    for step in range(2):
        lease.moved_to(await store.save("shop", {"step": step}, fence=lease.fence()))
    await audit.append("decision", "shop", "rollguard", {"step": 1}, fence=lease.fence())
    await eventually(lambda: follows.state == {"step": 1}, 5)

    redis_server.stop()
    await _every_call_fails_as_unavailable(store, lease, evidence, audit)
    await eventually(lambda: not follower.available, 5)
    assert follower.problem is not None and "redis at" in follower.problem
    assert follows.state == {"step": 1}  # the last state applied is kept: no reset
    await eventually(lambda: not lease.held, LEASE_S * 2)  # and nobody decides

    redis_server.start()  # with its append-only file: every write is still there
    await eventually(lambda: follower.available and follower.listening, 10)
    assert await store.version("shop") == 2 and follows.state == {"step": 1}
    assert await lease.acquire() and lease.version == 2  # resumes from the state version
    lease.moved_to(await store.save("shop", {"step": 2}, fence=lease.fence()))
    await eventually(lambda: follows.state == {"step": 2}, 5)
    await audit.append("decision", "shop", "rollguard", {"step": 2}, fence=lease.fence())
    result = await audit.verify()
    assert (result.ok, result.entries) == (True, 2)
    # Each version applied once, in order (one may be skipped: a read found a later one).
    seen = [v for _, v in follows.applied if v is not None]
    assert seen == sorted(set(seen)) and seen[-1] == 3


async def test_a_redis_that_lost_its_data_is_restored_from_the_version_known(
    redis_server: RedisServer,
) -> None:
    target = redis_server.target
    client = target.client()
    try:
        store = RedisStateStore(client, target, key=KEY)
        follows = Follows()
        follower = StateFollower(store, follows, reread_s=0.1, resubscribe_s=0.1)
        lease = Lease(client, target, "shop", holder="decider", lease_s=LEASE_S)
        async with running(follower.run()):
            await _lost_and_restored(redis_server, store, lease, follower, follows)
    finally:
        await client.aclose()


async def _lost_and_restored(
    redis_server: RedisServer,
    store: RedisStateStore,
    lease: Lease,
    follower: StateFollower,
    follows: Follows,
) -> None:
    assert await lease.acquire()
    for step in range(3):
        lease.moved_to(await store.save("shop", {"step": step}, fence=lease.fence()))
    await eventually(lambda: follower.known == {"shop": 3}, 5)
    known = await store.read("shop")
    assert known is not None

    redis_server.stop()
    for path in redis_server.directory.glob("appendonlydir/*"):
        path.unlink()  # a restart that lost everything (no persistence, a new replica)
    redis_server.start()
    await eventually(lambda: follower.available, 10)
    assert await store.read("shop") is None
    assert follows.state == {"step": 2}  # never back to nothing
    # The decider takes the lease again at version 0 and writes back what it knew,
    # above every version seen: the followers apply it as new.
    assert await lease.acquire() and lease.version == 0
    lease.moved_to(await store.restore("shop", known, fence=lease.fence()))
    assert lease.version == 4
    await eventually(lambda: follower.known == {"shop": 4}, 5)
    assert follows.state == {"step": 2} and follower.behind == {}


async def test_a_redis_that_stops_answering_is_an_outage_not_a_hang(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    store = RedisStateStore(client, redis_server.target)
    await store.save("shop", {"step": 1}, fence=Fence(0))
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)  # a partition: connected, silent
    try:
        with pytest.raises(FleetUnavailable, match=r"Timeout|timed out"):
            await store.load("shop")
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert await store.load("shop") == {"step": 1}
