"""Rollout state in Redis: one sealed document per rollout with a version (fencing token).

The counterpart of policy/store.py's StateStore for a fleet. Each rollout has a hash
`<prefix>:state:<name>` with `version` and `doc`; `doc` is the envelope

    {"audit_seq": N, "mac": "...", "name": "<rollout>", "state": {...}, "version": V}

sealed like a state file (HMAC-SHA256 under the audit key, or a plain sha256 without
one), the version included, so a document copied to another version or rollout does
not verify. Writes are a compare-and-set in one Lua script: the caller names the
version it last read (and, for a decider, its lease's holder id); the script refuses
the write (Fenced) unless both still hold, then bumps the version, writes the document
and publishes `<name> <version>` on `<prefix>:changes` (follow.py listens). A deleted
rollout keeps its version (a tombstone), so a stale writer cannot recreate it at a
version it once knew. A document that does not verify raises StateError, as a file
would; Redis not answering raises FleetUnavailable (a write's outcome is then unknown:
read the version again before deciding anything).
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from rollguard.policy.errors import StateError
from rollguard.policy.keys import AuditKey, plain_digest
from rollguard.policy.store import canonical
from rollguard.proxy.fleet.connection import RedisTarget, guard
from rollguard.proxy.fleet.errors import Fenced

PREFIX = "rollguard"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")  # metadata.name's own pattern
_FIELDS = {"audit_seq", "mac", "name", "state", "version"}

# KEYS: state hash, lease, names set. ARGV: name, expected version, new version, doc
# ("" deletes), holder ("" when no lease is required), channel.
_WRITE = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if ARGV[5] ~= '' then
  local raw = redis.call('GET', KEYS[2])
  if not raw then return {0, 'lease', current} end
  local lease = cjson.decode(raw)
  if lease['holder'] ~= ARGV[5] then return {0, 'lease', current} end
end
local new = tonumber(ARGV[3])
if current ~= tonumber(ARGV[2]) or new <= current then return {0, 'version', current} end
if ARGV[4] == '' then
  redis.call('HSET', KEYS[1], 'version', new)
  redis.call('HDEL', KEYS[1], 'doc')
  redis.call('SREM', KEYS[3], ARGV[1])
else
  redis.call('HSET', KEYS[1], 'version', new, 'doc', ARGV[4])
  redis.call('SADD', KEYS[3], ARGV[1])
end
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[2], cjson.encode({holder = ARGV[5], version = new}), 'KEEPTTL')
end
redis.call('PUBLISH', ARGV[6], ARGV[1] .. ' ' .. new)
return {1, 'ok', new}
"""


@dataclass(frozen=True, slots=True)
class Fence:
    """What a write must still be true of: the version the writer read, and its lease."""

    version: int
    holder: str | None = None  # None: no lease required (a plain compare-and-set)


@dataclass(frozen=True, slots=True)
class VersionedState:
    """One rollout's document as read: state, audit seq, seal kind and version."""

    state: dict[str, Any]
    audit_seq: int
    version: int
    sealed: Literal["key", "plain"]


def keys(prefix: str, name: str) -> tuple[str, str]:
    """The state hash and lease keys of rollout `name`."""
    return f"{prefix}:state:{name}", f"{prefix}:lease:{name}"


def channel(prefix: str) -> str:
    """The pub/sub channel every state write is announced on."""
    return f"{prefix}:changes"


class RedisStateStore:
    """Rollout state shared by a fleet; every method is a coroutine."""

    def __init__(
        self,
        client: aioredis.Redis,
        target: RedisTarget,
        *,
        key: AuditKey | None = None,
        prefix: str = PREFIX,
    ) -> None:
        self.client = client
        self.target = target
        self.key = key
        self.prefix = prefix
        self._write = client.register_script(_WRITE)

    def keys(self, name: str) -> tuple[str, str]:
        if not _NAME.match(name):
            raise StateError(f"{name!r} is not a rollout name")
        return keys(self.prefix, name)

    async def version(self, name: str) -> int:
        """The rollout's current version (0: never written)."""
        state_key, _ = self.keys(name)
        async with guard(self.target, f"reading {name}'s state version"):
            raw = await self.client.hget(state_key, "version")
        return 0 if raw is None else int(raw)

    async def read(self, name: str) -> VersionedState | None:
        """`name`'s state with its version, its seal verified; None if it has none."""
        state_key, _ = self.keys(name)
        async with guard(self.target, f"reading {name}'s state"):
            version, raw = await self.client.hmget(state_key, ["version", "doc"])
        if raw is None:
            return None
        stored = self._unseal(name, raw)
        if version is None or stored.version != int(version):
            raise StateError(
                f"redis {self.target.display} {state_key}: holds the document of version "
                f"{stored.version} under version {version!r}: it was copied there from elsewhere"
            )
        return stored

    async def load(self, name: str) -> dict[str, Any] | None:
        """`name`'s state, or None; StateError if it does not verify."""
        stored = await self.read(name)
        return None if stored is None else stored.state

    async def names(self) -> list[str]:
        """The rollouts that have a state."""
        async with guard(self.target, "listing rollouts"):
            members = await self.client.smembers(f"{self.prefix}:rollouts")
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    async def save(
        self, name: str, data: Mapping[str, Any], *, audit_seq: int = 0, fence: Fence
    ) -> int:
        """Write `name`'s state if `fence` still holds; the new version. Fenced if not."""
        version = fence.version + 1
        body = {"audit_seq": audit_seq, "name": name, "state": dict(data), "version": version}
        try:
            doc = canonical({**body, "mac": self._seal(body)})
        except (TypeError, ValueError) as exc:
            raise StateError(f"{name}: state is not JSON-serialisable: {exc}") from exc
        return await self._cas(name, doc, fence, version)

    async def delete(self, name: str, *, fence: Fence) -> int:
        """Forget `name`'s state (its version stays, as a tombstone); the new version."""
        return await self._cas(name, b"", fence, fence.version + 1)

    async def restore(self, name: str, stored: VersionedState, *, fence: Fence) -> int:
        """Write back a state Redis lost (a restart without persistence, a failover to a
        lagging replica): at a version above both the one held and the one in Redis, so
        every follower applies it and no stale writer's fence can match it."""
        version = max(stored.version, fence.version) + 1
        body = {
            "audit_seq": stored.audit_seq,
            "name": name,
            "state": stored.state,
            "version": version,
        }
        doc = canonical({**body, "mac": self._seal(body)})
        return await self._cas(name, doc, fence, version)

    async def _cas(self, name: str, doc: bytes, fence: Fence, version: int) -> int:
        state_key, lease_key = self.keys(name)
        args: list[bytes | str | int] = [
            name,
            fence.version,
            version,
            doc,
            fence.holder or "",
            channel(self.prefix),
        ]
        async with guard(self.target, f"writing {name}'s state"):
            ok, why, current = await self._write(
                keys=[state_key, lease_key, f"{self.prefix}:rollouts"], args=args
            )
        if not ok:
            if why == b"lease":
                raise Fenced(
                    f"{name}: not written: this process ({fence.holder}) no longer holds the "
                    "decider lease"
                )
            raise Fenced(
                f"{name}: not written: the state is at version {int(current)}, not "
                f"{fence.version} as this writer read it (another decider wrote since)"
            )
        return int(current)

    def _seal(self, body: Mapping[str, Any]) -> str:
        data = canonical(body)
        if self.key is None:
            return f"sha256:{plain_digest(data)}"
        return f"hmac-sha256:{self.key.id}:{self.key.mac(data)}"

    def _unseal(self, name: str, raw: bytes | str) -> VersionedState:
        where = f"redis {self.target.display} {self.keys(name)[0]}"
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise StateError(f"{where}: corrupt state ({exc})") from exc
        if not isinstance(doc, dict) or set(doc) != _FIELDS or not isinstance(doc["state"], dict):
            raise StateError(f"{where}: corrupt state (unexpected fields)")
        mac, body = str(doc["mac"]), {k: v for k, v in doc.items() if k != "mac"}
        kind, _, rest = mac.partition(":")
        sealed: Literal["key", "plain"]
        if kind == "hmac-sha256":
            key_id = rest.partition(":")[0]
            if self.key is None or key_id != self.key.id:
                configured = "no key is configured" if self.key is None else f"not {self.key.id}"
                raise StateError(f"{where}: sealed with audit key {key_id}, {configured}")
            expected, sealed = self._seal(body), "key"
        elif kind == "sha256":
            # Under a key a plain digest proves nothing: the caller trusts it no further
            # than the audit stream agrees with it (as for a state file).
            expected, sealed = f"sha256:{plain_digest(canonical(body))}", "plain"
        else:
            raise StateError(f"{where}: unknown seal {kind!r}")
        if not hmac.compare_digest(mac, expected):
            raise StateError(
                f"{where}: the state's seal does not verify: it was changed outside rollguard"
            )
        if doc["name"] != name or not isinstance(doc["audit_seq"], int):
            raise StateError(f"{where}: holds the state of {doc['name']!r}, not {name!r}")
        if not isinstance(doc["version"], int):
            raise StateError(f"{where}: corrupt state (version {doc['version']!r})")
        return VersionedState(doc["state"], doc["audit_seq"], doc["version"], sealed)
