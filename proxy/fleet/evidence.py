"""Fleet-wide evidence: each process publishes its windows' summaries; the decider merges.

Each process writes `<prefix>:evidence:<rollout>:<process>`, a hash of version ->
summary JSON (policy/summary.py), replaced whole every interval and given a time to
live of a few intervals: a process that dies stops refreshing its hash and Redis drops
it, so a dead process's numbers leave the merged sample instead of freezing in it. The
set `<prefix>:evidence:<rollout>` lists the processes; the decider reads every listed
hash and removes the members whose hash has expired. Summaries are counts since the
rollout generation began, so the latest one of each process is all the decider needs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from rollguard.policy.summary import VariantSummary
from rollguard.proxy.fleet.connection import RedisTarget, guard
from rollguard.proxy.fleet.store import PREFIX

log = logging.getLogger("rollguard.fleet")
TTL_INTERVALS = 3  # a summary outlives two missed publications, not three
# KEYS: a process's hash, the index. ARGV: the process. Unlisted only if still expired.
_FORGET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('SREM', KEYS[2], ARGV[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class Gathered:
    """What the decider read: each live process's summaries, and what it could not read."""

    summaries: dict[str, list[VariantSummary]] = field(default_factory=dict)  # process -> ...
    invalid: dict[str, str] = field(default_factory=dict)  # process -> why it was left out

    def all(self) -> list[VariantSummary]:
        return [s for found in self.summaries.values() for s in found]


class FleetEvidence:
    """One rollout's evidence in Redis, as seen from one process."""

    def __init__(
        self,
        client: aioredis.Redis,
        target: RedisTarget,
        rollout: str,
        process: str,
        *,
        prefix: str = PREFIX,
    ) -> None:
        self.client = client
        self.target = target
        self.rollout = rollout
        self.process = process
        self._index = f"{prefix}:evidence:{rollout}"
        self._forget = client.register_script(_FORGET)

    def _key(self, process: str) -> str:
        return f"{self._index}:{process}"

    async def publish(self, summaries: Iterable[VariantSummary], *, interval_s: float) -> None:
        """Replace this process's summaries; they expire after TTL_INTERVALS intervals."""
        fields = {s.version: json.dumps(s.to_json(), separators=(",", ":")) for s in summaries}
        key, ttl_ms = self._key(self.process), max(1, round(interval_s * TTL_INTERVALS * 1000))
        async with guard(self.target, f"publishing {self.rollout}'s evidence"):
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(key)
            if fields:
                pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                pipe.pexpire(key, ttl_ms)
                pipe.sadd(self._index, self.process)
            await pipe.execute()

    async def withdraw(self) -> None:
        """Remove this process's summaries (a clean stop)."""
        async with guard(self.target, f"withdrawing {self.rollout}'s evidence"):
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self._key(self.process))
            pipe.srem(self._index, self.process)
            await pipe.execute()

    async def gather(self) -> Gathered:
        """Every live process's latest summaries (this one's included)."""
        async with guard(self.target, f"reading {self.rollout}'s evidence"):
            members = sorted(
                m.decode() if isinstance(m, bytes) else m
                for m in await self.client.smembers(self._index)
            )
            pipe = self.client.pipeline(transaction=False)
            for process in members:
                pipe.hgetall(self._key(process))
            hashes = await pipe.execute() if members else []
            for process, fields in zip(members, hashes, strict=True):
                if not fields:  # expired; unless it published again meanwhile
                    await self._forget(keys=[self._key(process), self._index], args=[process])
        found = Gathered()
        for process, fields in zip(members, hashes, strict=True):
            if not fields:
                continue
            try:
                found.summaries[process] = [
                    VariantSummary.from_json(json.loads(raw)) for raw in fields.values()
                ]
            except ValueError as exc:  # one process's damaged summary: left out, said so
                found.invalid[process] = str(exc)
                log.error("rollout %s: evidence of %s left out: %s", self.rollout, process, exc)
        return found
