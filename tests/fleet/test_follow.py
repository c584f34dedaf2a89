"""Followers apply every state change: at once by notification, and by re-reading when a
notification is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import redis.asyncio as aioredis

from rollguard.proxy.fleet.connection import PASSWORD_ENV, RedisTarget
from rollguard.proxy.fleet.follow import StateFollower
from rollguard.proxy.fleet.store import Fence, RedisStateStore, VersionedState
from tests.fleet.conftest import RedisServer
from tests.serving.support import eventually

APPLY_WITHIN_S = 1.0  # the promise: every process applies a change within a second


class Applied:
    """What a follower applied, in order."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, object] | None] = {}
        self.versions: list[tuple[str, int | None]] = []

    def __call__(self, name: str, stored: VersionedState | None) -> None:
        self.states[name] = None if stored is None else stored.state
        self.versions.append((name, None if stored is None else stored.version))

    def has(self, name: str, state: dict[str, object] | None) -> Callable[[], bool]:
        return lambda: name in self.states and self.states[name] == state


@asynccontextmanager
async def following(
    store: RedisStateStore, **options: float
) -> AsyncIterator[tuple[StateFollower, Applied]]:
    applied = Applied()
    follower = StateFollower(store, applied, **options)
    task = asyncio.create_task(follower.run())
    try:
        await eventually(lambda: follower.listening, 5)
        yield follower, applied
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_change_is_applied_within_a_second_by_notification(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    writer = RedisStateStore(client, redis_server.target)
    await writer.save("shop", {"weight": 5}, fence=Fence(0))
    # Re-reading only every 30 s: anything applied sooner came by notification.
    async with following(RedisStateStore(client, redis_server.target), reread_s=30) as (
        follower,
        applied,
    ):
        assert applied.states == {"shop": {"weight": 5}}  # read once subscribed
        await writer.save("shop", {"weight": 0}, fence=Fence(1))
        await eventually(applied.has("shop", {"weight": 0}), APPLY_WITHIN_S)
        await writer.save("cart", {"weight": 20}, fence=Fence(0))
        await eventually(applied.has("cart", {"weight": 20}), APPLY_WITHIN_S)
        await writer.delete("cart", fence=Fence(1))
        await eventually(applied.has("cart", None), APPLY_WITHIN_S)
        assert follower.applied["notice"] == 3
        assert follower.known == {"shop": 2, "cart": 2}


async def test_a_lost_subscription_heals_by_rereading(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    # The follower connects as its own Redis user, so that its subscription can be
    # taken away (and stay away) while its reads still work.
    await client.acl_setuser(
        "follower",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        channels=["*"],
        categories=["+@all"],
    )
    target = RedisTarget.parse(
        f"redis://follower@127.0.0.1:{redis_server.port}/0", {PASSWORD_ENV: "pw"}
    )
    own = target.client()
    writer = RedisStateStore(client, redis_server.target)
    try:
        async with following(RedisStateStore(own, target), reread_s=0.2, resubscribe_s=0.2) as (
            follower,
            applied,
        ):
            await client.acl_setuser("follower", enabled=True, reset_channels=True)
            await eventually(lambda: not follower.listening, 5)
            numsub = await client.pubsub_numsub("rollguard:changes")
            assert numsub == [(b"rollguard:changes", 0)]  # nobody hears the notification
            await writer.save("shop", {"phase": "rolled_back"}, fence=Fence(0))
            await eventually(applied.has("shop", {"phase": "rolled_back"}), APPLY_WITHIN_S)
            assert follower.applied == {"reread": 1}
            assert not follower.listening and follower.available
    finally:
        await own.aclose()


async def test_a_version_is_applied_once_and_never_backwards(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    writer = RedisStateStore(client, redis_server.target)
    async with following(RedisStateStore(client, redis_server.target), reread_s=0.05) as (
        follower,
        applied,
    ):
        for version in range(5):
            await writer.save("shop", {"step": version}, fence=Fence(version))
        await eventually(applied.has("shop", {"step": 4}), APPLY_WITHIN_S)
        seen = [v for _, v in applied.versions if v is not None]
        assert seen == sorted(set(seen))  # increasing, no version twice
        await client.flushdb()  # redis lost its data: the follower keeps what it knew
        await writer.save("shop", {"step": 0}, fence=Fence(0))
        await eventually(lambda: follower.behind == {"shop": 1}, 5)
        assert applied.states["shop"] == {"step": 4}


async def test_a_follower_cancelled_at_any_moment_of_its_start_ends(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    """A gateway that fails to start (its admin port taken) stops its follower within
    moments of starting it. redis-py can lose a cancellation that lands while it reads
    (it became a retried read timeout); the follower's loops still end."""
    store = RedisStateStore(client, redis_server.target)
    for attempt in range(40):
        follower = StateFollower(store, Applied())
        await follower.refresh()
        task = asyncio.create_task(follower.run())
        await asyncio.sleep(attempt * 0.0005)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done, f"follower still running 5 s after being cancelled (attempt {attempt})"
