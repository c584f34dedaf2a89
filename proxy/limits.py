"""Per-client rate limits on the data port: one token bucket per client, rate and burst
by tier.

A client is its authenticated principal (API key name, JWT subject), else the value of a
configured header (set by a trusted front proxy), else its address. Its tier comes with
its credential (the keys file's `tier`, a JWT's `tier` claim); everyone else has the
`default` tier. A request takes one token; an empty bucket answers 429 with Retry-After.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rollguard.proxy.errors import RateLimited


class Tier(BaseModel):
    """A bucket's size: `rate` tokens a second, at most `burst` saved up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float = Field(gt=0)  # requests per second, sustained
    burst: int = Field(ge=1)  # requests at once after an idle spell


class RateLimitConfig(BaseModel):
    """The `rate_limits` setting; nothing is limited unless a tier applies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Tier | None = None  # clients without a tier; None: they are not limited
    tiers: dict[str, Tier] = Field(default_factory=dict)  # by name, given by credentials
    header: str | None = None  # client id header, for clients without a credential
    max_clients: int = Field(default=100_000, ge=100)  # buckets kept; idle ones go first

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        # ROLLGUARD_RATE_LIMITS arrives as text: a YAML/JSON flow mapping.
        return yaml.safe_load(value) if isinstance(value, str) else value

    @property
    def enabled(self) -> bool:
        return self.default is not None or bool(self.tiers)


class TokenBucket:
    """`burst` tokens, refilled at `rate` a second; `take` spends one if there is one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken; else the seconds until one will be there."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full_at(self) -> float:
        """When the bucket will be full again (an idle bucket can then be forgotten)."""
        return self.stamp + (self.burst - self.tokens) / self.rate


class RateLimiter:
    """Every client's bucket; `check` spends a request's token or raises RateLimited."""

    def __init__(
        self, config: RateLimitConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.header = config.header.lower() if config.header else None
        self._clock = clock
        self._buckets: dict[str, tuple[Tier, TokenBucket]] = {}

    def tier_of(self, tier: str | None) -> Tier | None:
        if tier is not None:
            found = self.config.tiers.get(tier)
            if found is not None:
                return found
        return self.config.default

    def check(self, client: str, tier: str | None) -> None:
        """Spend one of `client`'s tokens; RateLimited when there is none."""
        limits = self.tier_of(tier)
        if limits is None:
            return
        now = self._clock()
        entry = self._buckets.get(client)
        if entry is None or entry[0] is not limits:  # new, or its tier changed
            if len(self._buckets) >= self.config.max_clients:
                self._forget(now)
            entry = self._buckets[client] = (limits, TokenBucket(limits.rate, limits.burst, now))
        wait = entry[1].take(now)
        if wait:
            raise RateLimited(
                f"rate limit of {limits.rate:g} requests/s (burst {limits.burst}) exceeded; "
                f"retry in {wait:.2f} s",
                retry_after=max(1, math.ceil(wait)),
            )

    def _forget(self, now: float) -> None:
        """Drop buckets that have refilled (a new one is the same); if none has, the
        oldest half, so that a flood of new clients cannot grow the table."""
        buckets = self._buckets
        full = [c for c, (_, b) in buckets.items() if b.full_at() <= now]
        for client in full:
            del buckets[client]
        if len(buckets) >= self.config.max_clients:
            for client in list(buckets)[: len(buckets) // 2]:
                del buckets[client]

    def __len__(self) -> int:
        return len(self._buckets)
