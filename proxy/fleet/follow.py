"""Followers: every process applies every rollout state change, within a second of its write.

Two paths, so that a lost message heals: the write script publishes `<name> <version>`
on `<prefix>:changes` and the listener reads the state at once; and every `reread_s`
the follower compares each rollout's version in Redis with the one it applied. A
version is applied once, and never one below the version already applied: a Redis
that comes back with less than it had (restarted without persistence, a failover to a
lagging replica) is reported in `behind`, for the decider to write back (store.py
`restore`), and the process keeps the state it knew. While Redis does not answer,
`available` is False and `problem` says why; the process keeps what it applied last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import Literal

from redis import exceptions as redis_errors
from redis.asyncio.client import PubSub

from rollguard.policy.errors import StateError
from rollguard.proxy.fleet.connection import guard, stop_if_cancelled
from rollguard.proxy.fleet.errors import FleetUnavailable
from rollguard.proxy.fleet.store import RedisStateStore, VersionedState, channel

log = logging.getLogger("rollguard.fleet")
REREAD_S = 0.5  # a lost notification heals within this (the promise is one second)
RESUBSCRIBE_S = 1.0

Via = Literal["notice", "reread"]
Apply = Callable[[str, VersionedState | None], None]  # (rollout, state; None: deleted)


class StateFollower:
    """Applies rollout states from Redis as they change; run() until cancelled."""

    def __init__(
        self,
        store: RedisStateStore,
        apply: Apply,
        *,
        reread_s: float = REREAD_S,
        resubscribe_s: float = RESUBSCRIBE_S,
    ) -> None:
        self.store = store
        self._apply = apply
        self.reread_s = reread_s
        self.resubscribe_s = resubscribe_s
        self.known: dict[str, int] = {}  # the version applied, per rollout
        self.behind: dict[str, int] = {}  # rollouts whose version in Redis went below it
        self.applied: Counter[Via] = Counter()  # how each applied change arrived
        self.invalid: dict[str, str] = {}  # rollouts whose state does not verify, and why
        self.listening = False
        self.available = True
        self.problem: str | None = None
        self._lock = asyncio.Lock()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._listen())
            group.create_task(self._reread_loop())

    async def refresh(self, via: Via = "reread") -> None:
        """Compare every rollout's version with the one applied; apply what moved on."""
        names = sorted(set(await self.store.names()) | set(self.known))
        if not names:
            return
        async with guard(self.store.target, "reading state versions"):
            pipe = self.store.client.pipeline(transaction=False)
            for name in names:
                pipe.hget(self.store.keys(name)[0], "version")
            versions = await pipe.execute()
        for name, raw in zip(names, versions, strict=True):
            await self._consider(name, 0 if raw is None else int(raw), via)

    async def _consider(self, name: str, version: int, via: Via) -> None:
        async with self._lock:
            known = self.known.get(name, 0)
            if via == "notice" and version <= known:
                return  # a notice overtaken by a read of a later version
            if version < known:
                if self.behind.get(name) != version:
                    log.error(
                        "rollout %s: redis holds state version %d, below the %d applied here: "
                        "redis lost writes; keeping the state known here",
                        name,
                        version,
                        known,
                    )
                self.behind[name] = version
                return
            self.behind.pop(name, None)
            if version == known:
                return
            try:
                stored = await self.store.read(name)
            except StateError as exc:
                if self.invalid.get(name) != str(exc):
                    log.error("rollout %s: not applying: %s", name, exc)
                self.invalid[name] = str(exc)
                return
            self.invalid.pop(name, None)
            latest = version if stored is None else max(version, stored.version)
            self._apply(name, stored)
            self.known[name] = latest
            self.applied[via] += 1

    async def _reread_loop(self) -> None:
        while True:
            stop_if_cancelled()
            try:
                await self.refresh()
            except FleetUnavailable as exc:
                self._outage(exc)
            else:
                if not self.available:
                    log.warning("redis answers again: state reconciled from its versions")
                self.available, self.problem = True, None
            await asyncio.sleep(self.reread_s)

    async def _listen(self) -> None:
        target = self.store.target
        while True:
            stop_if_cancelled()
            pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
            try:
                async with guard(target, "subscribing to state changes"):
                    await pubsub.subscribe(channel(self.store.prefix))
                self.listening = True
                await self.refresh()  # whatever was written while not subscribed
                while True:
                    stop_if_cancelled()
                    async with guard(target, "listening for state changes"):
                        message = await pubsub.get_message(timeout=self.reread_s)
                    if message is None or message.get("type") != "message":
                        continue
                    name, _, version = bytes(message["data"]).decode().partition(" ")
                    if version.isdigit():
                        await self._consider(name, int(version), "notice")
            except FleetUnavailable as exc:
                self._outage(exc)
            except (redis_errors.RedisError, StateError) as exc:
                log.warning("state change notifications stopped (%s); re-reading meanwhile", exc)
            finally:
                self.listening = False
                await _close_quietly(pubsub)
            await asyncio.sleep(self.resubscribe_s)

    def _outage(self, exc: FleetUnavailable) -> None:
        if self.available:
            log.error("%s; keeping the last state applied", exc)
        self.available, self.problem = False, str(exc)


async def _close_quietly(pubsub: PubSub) -> None:
    with contextlib.suppress(redis_errors.RedisError, OSError):  # the connection is gone
        await pubsub.aclose()
