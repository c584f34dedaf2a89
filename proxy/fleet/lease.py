"""One decider per rollout: a lease in Redis (SET NX PX), renewed, released, and fencing.

The lease key `<prefix>:lease:<name>` holds `{"holder": id, "version": V}`: who decides,
and the state version it last read or wrote (store.py's write script moves it along).
A holder renews every third of the lease time; a holder that stops (killed, partitioned,
paused) loses the lease when it expires and another contender takes it within the
lease time. Losing is detected before any write twice over: `fence()` refuses once the
local deadline (the last renewal sent plus the lease time, less a margin for clock
drift) has passed, and the write script itself checks the holder in Redis.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from rollguard.proxy.fleet.connection import RedisTarget, guard, stop_if_cancelled
from rollguard.proxy.fleet.errors import Fenced, FleetUnavailable
from rollguard.proxy.fleet.store import PREFIX, Fence, keys

log = logging.getLogger("rollguard.fleet")
LEASE_S = 5.0
_DRIFT = 0.9  # trust a renewal for 90 % of the lease time: clocks and pauses drift

# KEYS: lease, state hash. ARGV: holder, ttl ms.
_ACQUIRE = """
local version = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
local value = cjson.encode({holder = ARGV[1], version = version})
if redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[2]) then return {1, ARGV[1], version} end
local lease = cjson.decode(redis.call('GET', KEYS[1]))
if lease['holder'] == ARGV[1] then
  redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
  return {1, ARGV[1], version}
end
return {0, lease['holder'], redis.call('PTTL', KEYS[1])}
"""
# KEYS: lease. ARGV: holder, ttl ms (renew) or nothing (release).
_RENEW = """
local raw = redis.call('GET', KEYS[1])
if not raw or cjson.decode(raw)['holder'] ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
_RELEASE = """
local raw = redis.call('GET', KEYS[1])
if not raw or cjson.decode(raw)['holder'] ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


def holder_id() -> str:
    """A holder id unique to this process and start: host/pid/random."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


class Lease:
    """This process's claim to decide one rollout."""

    def __init__(
        self,
        client: aioredis.Redis,
        target: RedisTarget,
        name: str,
        *,
        holder: str | None = None,
        lease_s: float = LEASE_S,
        prefix: str = PREFIX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s {lease_s!r}: expected a positive number of seconds")
        self.client = client
        self.target = target
        self.name = name
        self.holder = holder or holder_id()
        self.lease_s = lease_s
        self.version = 0  # the state version this holder last read or wrote
        self.other: str | None = None  # who held it at our last failed attempt
        self._other_ttl_s = 0.0  # and how long it had left then
        self._clock = clock
        self._until = -1.0  # local deadline: not held after this instant
        self._lease_key, self._state_key = keys(prefix, name)[1], keys(prefix, name)[0]
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def held(self) -> bool:
        """Whether this process may still act as decider (by its own clock)."""
        return self._clock() < self._until

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.lease_s * 1000))

    def fence(self) -> Fence:
        """The fence for the next write; Fenced if the lease may have expired."""
        if not self.held:
            raise Fenced(f"{self.name}: this process ({self.holder}) does not hold the lease")
        return Fence(self.version, self.holder)

    def moved_to(self, version: int) -> None:
        """Record the version this holder's last write produced."""
        self.version = version

    async def acquire(self) -> bool:
        """Take the lease if it is free (or already ours); whether this process holds it.

        On success `version` is the state's current version: decide from a state read
        at that version, and write with `fence()`."""
        sent = self._clock()
        async with guard(self.target, f"acquiring {self.name}'s lease"):
            ok, who, number = await self._acquire(
                keys=[self._lease_key, self._state_key], args=[self.holder, self._ttl_ms]
            )
        if ok:
            self._until, self.version, self.other = sent + self.lease_s * _DRIFT, int(number), None
            return True
        self._until, self.other = -1.0, who.decode() if isinstance(who, bytes) else str(who)
        self._other_ttl_s = max(0.0, int(number) / 1000)
        return False

    async def renew(self) -> bool:
        """Extend the lease; False (and no longer held) if another process has it now."""
        sent = self._clock()
        async with guard(self.target, f"renewing {self.name}'s lease"):
            ok = await self._renew(keys=[self._lease_key], args=[self.holder, self._ttl_ms])
        self._until = sent + self.lease_s * _DRIFT if ok else -1.0
        return bool(ok)

    async def release(self) -> None:
        """Give the lease up (a clean stop), so another process takes over at once."""
        self._until = -1.0
        async with guard(self.target, f"releasing {self.name}'s lease"):
            await self._release(keys=[self._lease_key], args=[self.holder])

    async def holder_now(self) -> str | None:
        """Who holds the lease in Redis right now (None: nobody)."""
        async with guard(self.target, f"reading {self.name}'s lease"):
            raw = await self.client.get(self._lease_key)
        if raw is None:
            return None
        value = json.loads(raw)
        return str(value["holder"]) if isinstance(value, dict) else None

    async def campaign(self, on_change: Callable[[bool], None] | None = None) -> None:
        """Hold the lease for as long as this runs: renew it while held, try to take it
        while not. Runs until cancelled (then the lease is left to expire: a clean stop
        calls release()). `on_change(held)` is called whenever holding changes."""
        was = False
        while True:
            stop_if_cancelled()
            try:
                now_held = await (self.renew() if self.held else self.acquire())
            except FleetUnavailable as exc:
                now_held = self.held  # until the local deadline: nobody else can renew
                log.warning("%s", exc)
            if now_held != was:
                was = now_held
                log.info("rollout %s: %s the decider lease", self.name, "holds" if was else "lost")
                if on_change is not None:
                    on_change(was)
            pause = self.lease_s / 3
            if not now_held and self.other is not None:
                pause = min(pause, self._other_ttl_s + 0.01)  # try just as it expires
            await asyncio.sleep(pause)
