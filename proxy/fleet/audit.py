"""The audit log of a fleet: a Redis stream, hash-chained exactly like audit.jsonl.

Entries are the same canonical JSON lines, sealed by policy/chain.py (sha256, or an
HMAC under the audit key: the key never goes to Redis), appended to the stream
`<prefix>:audit` with the entry's seq as its id (`<seq>-0`); `<prefix>:audit:head`
holds the last seq and hash, like audit.jsonl.head. An append is one Lua script that
checks, atomically, that the head is still the one the entry was chained to and (for a
decider's record) that the writer still holds the rollout's lease: two writers never
fork the chain (the loser re-reads the head and re-seals), and a stale decider's record
is refused (Fenced). Any process reads the stream; `verify` walks it with the file log's
own chain walker, so the two verify by one definition.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import redis.asyncio as aioredis

from rollguard.policy.audit import format_entries
from rollguard.policy.chain import GENESIS, VerifyResult, Walk, seal
from rollguard.policy.errors import AuditError
from rollguard.policy.keys import AuditKey
from rollguard.proxy.fleet.connection import RedisTarget, guard
from rollguard.proxy.fleet.errors import Fenced
from rollguard.proxy.fleet.store import PREFIX, Fence, keys

_PAGE = 1000
# A lost race is another writer's append: retry (after a random pause, so that no writer
# starves) until this long has passed, then give up with AuditError.
_RACE_S = 5.0

# KEYS: stream, head, lease ("" allowed when ARGV[4] is ""), once (used when ARGV[6] is
# not ""). ARGV: expected head ("<seq> <hash>"), id, line, holder, new head, once's time
# to live in ms: an entry whose once key exists is not written again.
_APPEND = """
if ARGV[4] ~= '' then
  local raw = redis.call('GET', KEYS[3])
  if not raw or cjson.decode(raw)['holder'] ~= ARGV[4] then return {0, 'lease'} end
end
if ARGV[6] ~= '' and redis.call('EXISTS', KEYS[4]) == 1 then return {0, 'once'} end
local head = redis.call('GET', KEYS[2]) or ('0 ' .. string.rep('0', 64))
if head ~= ARGV[1] then return {0, head} end
redis.call('XADD', KEYS[1], ARGV[2], 'line', ARGV[3])
redis.call('SET', KEYS[2], ARGV[5])
if ARGV[6] ~= '' then redis.call('SET', KEYS[4], '1', 'PX', ARGV[6]) end
return {1, ARGV[5]}
"""


class RedisAuditLog:
    """Appends to and reads the fleet's audit stream; every method is a coroutine."""

    def __init__(
        self,
        client: aioredis.Redis,
        target: RedisTarget,
        *,
        key: AuditKey | None = None,
        prefix: str = PREFIX,
        clock: Callable[[], float] | None = None,
    ) -> None:
        # Wall clock on purpose: `ts` is a record for people, not a deadline.
        self.client = client
        self.target = target
        self.key = key
        self.prefix = prefix
        self.stream, self.head_key = f"{prefix}:audit", f"{prefix}:audit:head"
        self._clock = clock or (lambda: datetime.now(UTC).timestamp())
        self._append = client.register_script(_APPEND)
        self._head: tuple[int, str] | None = None  # as last seen; re-read on a lost race
        # One append at a time from this process: races are then only between processes.
        self._lock = asyncio.Lock()

    @property
    def keyed(self) -> bool:
        return self.key is not None

    async def head(self) -> tuple[int, str]:
        """The last entry's seq and hash (0 and GENESIS for an empty stream)."""
        async with guard(self.target, "reading the audit head"):
            raw = await self.client.get(self.head_key)
        self._head = _parse_head(raw)
        return self._head

    async def append(
        self,
        kind: str,
        rollout: str | None,
        actor: str,
        data: Mapping[str, Any],
        *,
        fence: Fence | None = None,
    ) -> dict[str, Any]:
        """Append one entry and return it as stored. With `fence` (a decider's record)
        the append is refused (Fenced) unless its holder still holds `rollout`'s lease."""
        if fence is not None and (rollout is None or fence.holder is None):
            raise ValueError("a fenced audit entry names its rollout and the lease holder")
        lease = keys(self.prefix, rollout)[1] if fence is not None and rollout else self.head_key
        async with self._lock:
            stored = await self._append_chained(kind, rollout, actor, data, fence, lease)
        assert stored is not None  # only a `once` append is ever skipped
        return stored

    async def append_once(
        self,
        kind: str,
        rollout: str | None,
        actor: str,
        data: Mapping[str, Any],
        *,
        once: str,
        ttl_s: float,
    ) -> dict[str, Any] | None:
        """Append one entry unless an entry with the same `once` identity was appended in
        the last `ttl_s` seconds (by any process): None then. What every process sees
        alike (a policy file's change) is recorded once for the fleet."""
        digest = hashlib.sha256(once.encode("utf-8")).hexdigest()
        once_key = f"{self.prefix}:audit:once:{digest}"
        async with self._lock:
            return await self._append_chained(
                kind, rollout, actor, data, None, self.head_key, (once_key, ttl_s)
            )

    async def _append_chained(
        self,
        kind: str,
        rollout: str | None,
        actor: str,
        data: Mapping[str, Any],
        fence: Fence | None,
        lease: str,
        once: tuple[str, float] | None = None,
    ) -> dict[str, Any] | None:
        deadline, lost = time.monotonic() + _RACE_S, 0
        once_key, once_ms = (
            ("", "") if once is None else (once[0], str(max(1, round(once[1] * 1000))))
        )
        while True:
            seq, prev = self._head if self._head is not None else await self.head()
            entry: dict[str, Any] = {
                "seq": seq + 1,
                "ts": _iso(self._clock()),
                "kind": kind,
                "rollout": rollout,
                "actor": actor,
                "data": dict(data),
                "prev": prev,
            }
            try:
                line = seal(entry, self.key)
            except (TypeError, ValueError) as exc:
                raise AuditError(f"audit entry {kind!r} is not JSON-serialisable: {exc}") from exc
            args = [
                f"{seq} {prev}",
                f"{seq + 1}-0",
                line.rstrip(b"\n"),
                "" if fence is None else fence.holder or "",
                f"{seq + 1} {entry['hash']}",
                once_ms,
            ]
            async with guard(self.target, f"appending {kind!r} to the audit stream"):
                ok, head = await self._append(
                    keys=[self.stream, self.head_key, lease, once_key or self.head_key],
                    args=args,  # type: ignore[arg-type]
                )
            if ok:
                self._head = (seq + 1, entry["hash"])
                stored: dict[str, Any] = json.loads(line)
                return stored
            if head == b"once":
                return None
            if head == b"lease":
                raise Fenced(
                    f"{rollout}: audit entry {kind!r} not written: this process "
                    f"({fence.holder if fence else None}) no longer holds the decider lease"
                )
            self._head = _parse_head(head)  # another writer appended first: chain to it
            lost += 1
            if time.monotonic() > deadline:
                raise AuditError(
                    f"audit stream {self.stream}: {lost} appends in {_RACE_S:g} s lost the race "
                    "to other writers"
                )
            await asyncio.sleep(random.uniform(0, 0.002 * min(lost, 10)))

    async def entries(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> list[dict[str, Any]]:
        """Entries with since <= ts < until (naive datetimes are UTC); unverified."""
        lo, hi = _utc(since), _utc(until)
        found = []
        async for _, raw in self._lines():
            try:
                entry = json.loads(raw)
                ts = datetime.fromisoformat(entry["ts"])
            except (ValueError, KeyError, TypeError) as exc:
                raise AuditError(f"{self.stream}: unreadable audit entry: {exc}") from exc
            if (lo is None or ts >= lo) and (hi is None or ts < hi):
                found.append(entry)
        return found

    async def export(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        fmt: Literal["json", "csv"] = "json",
    ) -> str:
        """As policy/audit.py `export` writes the file log's entries."""
        return format_entries(await self.entries(since=since, until=until), fmt)

    async def verify(self) -> VerifyResult:
        """Every entry's hash (or MAC), seq, prev link and stream id, then the head."""
        walk = Walk(self.key)
        async with guard(self.target, "reading the audit head"):
            raw_head = await self.client.get(self.head_key)
        async for stream_id, raw in self._lines():
            walk.feed(raw + b"\n")
            if not walk.problems and stream_id != f"{walk.last_seq}-0":
                why = f"stream id {stream_id} does not match the entry's seq {walk.last_seq}"
                walk.problems.append((walk.lines, why, walk.verified - 1))
        head = None if raw_head is None else _parse_head(raw_head)
        return walk.result(head)

    async def _lines(self) -> AsyncIterator[tuple[str, bytes]]:
        """(stream id, line) for every entry, oldest first, a page at a time."""
        start = "-"
        while True:
            async with guard(self.target, "reading the audit stream"):
                page = await self.client.xrange(self.stream, start, "+", count=_PAGE) or []
            for stream_id, fields in page:
                line = (fields or {}).get(b"line", b"")
                yield _text(stream_id), line if isinstance(line, bytes) else line.encode()
            if len(page) < _PAGE:
                return
            start = "(" + _text(page[-1][0])


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_head(raw: bytes | str | None) -> tuple[int, str]:
    if raw is None:
        return 0, GENESIS
    text = raw.decode() if isinstance(raw, bytes) else raw
    seq, _, digest = text.partition(" ")
    if not seq.isdigit() or len(digest) != 64:
        raise AuditError(f"audit head {text[:100]!r} is damaged")
    return int(seq), digest


def _iso(seconds: float) -> str:
    stamp = datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="microseconds")
    return stamp.replace("+00:00", "Z")


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)
