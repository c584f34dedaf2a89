"""The fleet's audit stream: chained like the file log, one chain however many writers,
a stale decider's record refused, tampering found by the same walker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from rollguard.policy.audit import AuditLog, export
from rollguard.policy.keys import AuditKey
from rollguard.policy.store import canonical
from rollguard.proxy.fleet.audit import RedisAuditLog
from rollguard.proxy.fleet.errors import Fenced
from rollguard.proxy.fleet.lease import Lease
from tests.fleet.conftest import RedisServer
from tests.fleet.support import until
from tests.serving.support import eventually

KEY = AuditKey(b"a" * 32)


def _log(client: aioredis.Redis, server: RedisServer, key: AuditKey | None = KEY) -> RedisAuditLog:
    return RedisAuditLog(client, server.target, key=key, clock=lambda: 1_800_000_000.0)


async def test_entries_chain_verify_and_export_like_the_file_log(
    client: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    stream = _log(client, redis_server)
    assert (await stream.verify()).ok and await stream.head() == (0, "0" * 64)
    entries = [
        await stream.append("start", "shop", "rollguard", {"state": {"step": 0}}),
        await stream.append("decision", "shop", "rollguard", {"action": "rollback"}),
        await stream.append("policy_applied", None, "policy-watcher", {"file": "shop.yaml"}),
    ]
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[1]["prev"] == entries[0]["hash"] and entries[0]["key"] == KEY.id
    result = await stream.verify()
    assert (result.ok, result.entries, result.keyed) == (True, 3, True)
    assert await stream.entries() == entries
    # The same entries in a file log export byte for byte the same.
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, clock=lambda: 1_800_000_000.0, key=KEY) as file_log:
        for e in entries:
            file_log.append(e["kind"], e["rollout"], e["actor"], e["data"])
    for fmt in ("json", "csv"):
        assert await stream.export(fmt=fmt) == export(path, fmt=fmt)


async def test_concurrent_writers_keep_one_chain(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    writers = [_log(client, redis_server) for _ in range(4)]
    await asyncio.gather(
        *(
            w.append("admin", "shop", f"writer-{i}", {"n": n})
            for n in range(10)
            for i, w in enumerate(writers)
        )
    )
    result = await writers[0].verify()
    assert (result.ok, result.entries) == (True, 40)
    entries = await writers[1].entries()
    assert [e["seq"] for e in entries] == list(range(1, 41))
    assert sorted((e["actor"], e["data"]["n"]) for e in entries) == sorted(
        (f"writer-{i}", n) for n in range(10) for i in range(4)
    )


async def test_what_every_process_sees_is_recorded_once(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    writers = [_log(client, redis_server) for _ in range(4)]
    data = {"file": "shop.yaml", "changed": ["spec.steps"]}

    async def note(w: RedisAuditLog, content: str, ttl_s: float = 60.0) -> object:
        return await w.append_once(
            "policy_applied", "shop", "policy-watcher", data, once=content, ttl_s=ttl_s
        )

    written = await asyncio.gather(*(note(w, "v2") for w in writers))
    assert sum(e is not None for e in written) == 1
    # Another content is another event; the chain stays one.
    assert await note(writers[1], "v3") is not None
    # Once its identity has expired, the same event is recorded again.
    assert await note(writers[2], "v4", ttl_s=0.05) is not None

    async def again() -> bool:
        return await note(writers[3], "v4", ttl_s=0.05) is not None

    await until(again, 5.0)
    result = await writers[0].verify()
    assert (result.ok, result.entries) == (True, 4)


async def test_a_stale_deciders_record_is_refused(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    stream = _log(client, redis_server)
    a = Lease(client, redis_server.target, "shop", holder="a", lease_s=0.3)
    b = Lease(client, redis_server.target, "shop", holder="b", lease_s=0.3)
    assert await a.acquire()
    await stream.append("decision", "shop", "rollguard", {"action": "promote"}, fence=a.fence())
    stale = a.fence()
    await eventually(lambda: not a.held, 2)
    await until(b.acquire, 2)  # a's lease expires in Redis a little after its own deadline
    await stream.append("decision", "shop", "rollguard", {"action": "rollback"}, fence=b.fence())
    with pytest.raises(Fenced, match="no longer holds the decider lease"):
        await stream.append("decision", "shop", "rollguard", {"action": "promote"}, fence=stale)
    entries = await stream.entries()
    assert [e["data"]["action"] for e in entries] == ["promote", "rollback"]
    assert (await stream.verify()).ok


async def test_tampering_is_found(client: aioredis.Redis, redis_server: RedisServer) -> None:
    stream = _log(client, redis_server)
    for n in range(4):
        await stream.append("admin", "shop", "ops", {"n": n})
    lines = [canonical(e) for e in await stream.entries()]  # each entry's line as stored

    async def rebuild(new_lines: list[bytes], ids: list[int]) -> None:
        await client.delete("rollguard:audit")
        for i, line in zip(ids, new_lines, strict=True):
            await client.xadd("rollguard:audit", {"line": line}, id=f"{i}-0")

    changed = json.loads(lines[1])
    changed["data"]["n"] = 99
    await rebuild(
        [lines[0], json.dumps(changed, separators=(",", ":"), sort_keys=True).encode(), *lines[2:]],
        [1, 2, 3, 4],
    )
    result = await stream.verify()
    assert (result.ok, result.first_bad_line) == (False, 2) and "MAC mismatch" in str(result.reason)
    await rebuild([lines[0], *lines[2:]], [1, 3, 4])  # an entry removed
    result = await stream.verify()
    assert (result.ok, result.first_bad_line) == (False, 2) and "seq is 3, expected 2" in str(
        result.reason
    )
    await rebuild(lines[:3], [1, 2, 3])  # the last entry removed: the head says 4
    result = await stream.verify()
    assert not result.ok and "removed from the end" in str(result.reason)
    await rebuild(lines, [1, 2, 3, 5])  # an id that is not the entry's seq
    result = await stream.verify()
    assert not result.ok and "stream id 5-0" in str(result.reason)
    await rebuild(lines, [1, 2, 3, 4])
    assert (await stream.verify()).ok
    unkeyed = await _log(client, redis_server, key=None).verify()
    assert not unkeyed.ok and "needs the key" in str(unkeyed.reason)
