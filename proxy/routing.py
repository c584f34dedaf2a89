"""Per-request variant choice: sticky hash or random splits on precomputed tables.

The policy engine builds one immutable `SplitTable` per model and swaps it into the
`Router`; the request path only reads a dict and does integer comparisons. A table
whose candidate cannot take traffic says why (`failover`): the split still picks the
candidate for its share, and the request path serves that share from the stable.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Protocol

Role = Literal["stable", "candidate"]
SplitMode = Literal["hash", "random"]

BUCKETS = 10_000
"""Weights resolve to basis points: a key's bucket is in [0, BUCKETS)."""

HASH_PERSON = b"rollguard/split"
"""blake2b personalisation of the split hash. Part of the on-the-wire contract: a key's
bucket must not change across versions, replicas or restarts, so never change this."""

# Copying a keyed, personalised state is cheaper than building one per call.
_HASH_BASE = hashlib.blake2b(digest_size=8, person=HASH_PERSON)
_from_bytes = int.from_bytes


def bucket(key: str) -> int:
    """The key's stable bucket in [0, BUCKETS): blake2b-64 (big-endian) modulo BUCKETS.

    Independent of PYTHONHASHSEED, process and platform; the modulo bias of a 64-bit
    digest over 10,000 buckets is below 1e-15.
    """
    h = _HASH_BASE.copy()
    # surrogatepass: header text decoded with surrogateescape must hash, not raise.
    h.update(key.encode("utf-8", "surrogatepass"))
    return _from_bytes(h.digest(), "big") % BUCKETS


class RandomSource(Protocol):
    """What a random split needs from `random.Random`: uniform floats in [0, 1)."""

    def random(self) -> float: ...


_RNG = random.Random()


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where a request's stickiness key lives: a header or a cookie, by name."""

    kind: Literal["header", "cookie"]
    name: str

    @classmethod
    def parse(cls, spec: str) -> KeySource:
        """Parse a policy `key` string, `header:NAME` or `cookie:NAME`."""
        kind, sep, name = spec.partition(":")
        if not sep or not name or kind not in ("header", "cookie"):
            raise ValueError(f"key {spec!r}: expected 'header:NAME' or 'cookie:NAME'")
        return cls("header" if kind == "header" else "cookie", name)

    def extract(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
        """The key's value, or None when absent or empty (an empty key is no key).

        `headers`: the request's, by lower-case name (proxy/wire.py `Request.headers`).
        """
        if self.kind == "header":
            return headers.get(self.name.lower()) or None
        return cookies.get(self.name) or None

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True, slots=True)
class SplitTable:
    """One model's split between stable and candidate, resolved for the hot path.

    Hash mode sends a key to the candidate iff its bucket is below the threshold, so
    raising the weight only moves keys toward the candidate. Requests without a key,
    and random mode, draw from `rng`.
    """

    model: str
    stable: str
    candidate: str | None = None
    weight: float = 0.0  # percent of traffic to the candidate, 0..100
    split: SplitMode = "hash"
    key_source: KeySource | None = None
    shadows: tuple[str, ...] = ()
    # Why the candidate cannot take traffic now (an Availability value), or None.
    failover: str | None = None
    rng: RandomSource = field(default=_RNG, repr=False, compare=False)
    threshold: int = field(init=False)  # basis points: weight * 100, rounded
    _stable: tuple[str, Role] = field(init=False, repr=False, compare=False)
    _candidate: tuple[str, Role] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 100.0:  # also rejects NaN
            raise ValueError(f"weight {self.weight!r}: expected a percent in [0, 100]")
        if self.split not in ("hash", "random"):
            raise ValueError(f"split {self.split!r}: expected 'hash' or 'random'")
        if self.candidate is None and self.weight:
            raise ValueError(f"weight {self.weight!r} given for {self.model!r} without a candidate")
        threshold = round(self.weight * (BUCKETS // 100))
        # Fixed (version, role) pairs so choose() allocates nothing.
        set_ = object.__setattr__
        set_(self, "threshold", threshold)
        set_(self, "_stable", (self.stable, "stable"))
        set_(self, "_candidate", (self.candidate or self.stable, "candidate"))

    @classmethod
    def single(cls, model: str, version: str) -> SplitTable:
        """A model with no rollout: every request goes to its one version."""
        return cls(model=model, stable=version)

    def choose(self, key: str | None) -> tuple[str, Role]:
        """The (version, role) that serves a request with this stickiness key."""
        threshold = self.threshold
        if threshold <= 0:
            return self._stable
        if threshold >= BUCKETS:
            return self._candidate
        if key is not None and self.split == "hash":
            draw = bucket(key)
        else:
            draw = int(self.rng.random() * BUCKETS)
        return self._candidate if draw < threshold else self._stable


class Router:
    """The current SplitTable per model, replaced copy-on-write.

    Readers take one dict lookup and never lock; writers (the policy engine, maybe
    from another thread) serialise on a lock and publish a fresh dict in one
    assignment, so a reader sees either the old table or the new one.
    """

    __slots__ = ("_lock", "_tables")

    def __init__(self, tables: Iterable[SplitTable] = ()) -> None:
        self._tables: dict[str, SplitTable] = {t.model: t for t in tables}
        self._lock = threading.Lock()

    def table(self, model: str) -> SplitTable | None:
        return self._tables.get(model)

    def set_table(self, table: SplitTable) -> None:
        with self._lock:
            tables = dict(self._tables)
            tables[table.model] = table
            self._tables = tables

    def remove(self, model: str) -> None:
        with self._lock:
            if model in self._tables:
                tables = dict(self._tables)
                del tables[model]
                self._tables = tables

    def tables(self) -> Mapping[str, SplitTable]:
        """A read-only snapshot of every model's table."""
        return MappingProxyType(self._tables)


def stickiness_key(router: Router, model: str, headers: Mapping[str, str]) -> str | None:
    """The request's stickiness key for `model`'s split; `headers` keyed by lower-case
    names (or case-insensitive)."""
    table = router._tables.get(model)  # Router.table, without a call per request
    source = table.key_source if table is not None else None
    if source is None:
        return None
    if source.kind == "cookie":
        return cookie_value(headers.get("cookie", ""), source.name)
    # A header's name in lower case, as `headers` are keyed (what `extract` would read).
    return headers.get(source.name.lower()) or None


def cookie_value(header: str, name: str) -> str | None:
    """The first value of cookie `name` in a Cookie header, None when absent or empty.

    Read as browsers send it and RFC 6265 section 5.4 writes it: `name=value` pairs split
    on ';', whitespace around each trimmed, a value in double quotes unquoted. Parsed
    leniently, pair by pair: another cookie that is not a valid `token=value` (JSON, a
    space, non-ASCII, no '=') never hides this one. http.cookies stopped at the first such
    pair, and the user lost their stickiness to the random split."""
    for pair in header.split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value or None
    return None
