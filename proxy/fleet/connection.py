"""The `state: redis://host:port/db` target, the client it opens, and the one fault translation.

`redis://` is plain TCP, `rediss://` TLS. A password is never written in the URL (which
lands in settings files, logs and status pages): it comes from the environment variable
ROLLGUARD_REDIS_PASSWORD, and a URL that carries one is refused. A user name may be
given in the URL (Redis ACLs). `display` is the form safe to log.

Every Redis call of the fleet package runs inside `guard()`, which turns the client's
connection, timeout and server-loading errors (and OSError) into FleetUnavailable naming
the target: callers handle one exception type for "Redis did not answer".
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from rollguard.proxy.fleet.errors import FleetUnavailable, InvalidTarget

PASSWORD_ENV = "ROLLGUARD_REDIS_PASSWORD"
# A call that has not answered in a second is an outage as far as routing cares: the
# gateway keeps its last weights rather than wait on Redis.
TIMEOUT_S = 1.0
_OUTAGES = (
    redis_errors.ConnectionError,  # BusyLoadingError (a restarting server) is one
    redis_errors.TimeoutError,
    redis_errors.TryAgainError,
    redis_errors.ReadOnlyError,  # a replica promoted away from under us
    OSError,
)


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where fleet state lives: host, port, database, TLS, credentials (password hidden)."""

    host: str
    port: int = 6379
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, environ: Mapping[str, str] = os.environ) -> RedisTarget:
        """`redis://[user@]host[:port][/db]` or `rediss://...`; InvalidTarget names the fault."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidTarget(f"state {_redacted(url)!r}: not a URL: {exc}") from None
        if parts.scheme not in ("redis", "rediss"):
            raise InvalidTarget(
                f"state {_redacted(url)!r}: scheme {parts.scheme!r}; expected redis:// or rediss://"
            )
        if parts.password is not None:
            raise InvalidTarget(
                f"state {_redacted(url)!r}: a password in the URL would be logged and stored "
                f"with the settings; set it in the environment variable {PASSWORD_ENV}"
            )
        if not parts.hostname:
            raise InvalidTarget(f"state {url!r}: no host (expected redis://host:port/db)")
        if parts.query or parts.fragment:
            raise InvalidTarget(f"state {url!r}: query and fragment are not supported")
        path = parts.path.strip("/")
        if path and not (path.isdigit() and int(path) < 2**16):
            raise InvalidTarget(f"state {url!r}: database {path!r} is not a number")
        return cls(
            host=parts.hostname,
            port=6379 if port is None else port,
            db=int(path) if path else 0,
            tls=parts.scheme == "rediss",
            username=unquote(parts.username) if parts.username else None,
            password=environ.get(PASSWORD_ENV) or None,
        )

    @property
    def display(self) -> str:
        """The URL without secrets, for logs, errors and status pages."""
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{user}{host}:{self.port}/{self.db}"

    def client(self, *, timeout_s: float = TIMEOUT_S, name: str | None = None) -> aioredis.Redis:
        """A pooled asyncio client; it connects lazily, on its first command."""
        return aioredis.Redis(
            host=self.host,
            port=self.port,
            db=self.db,
            username=self.username,
            password=self.password,
            ssl=self.tls,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # One quick retry covers a connection the server closed while idle; more
            # would only delay the outage the caller must act on.
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), retries=1),
            client_name=name,
            decode_responses=False,
        )


@asynccontextmanager
async def guard(target: RedisTarget, doing: str) -> AsyncIterator[None]:
    """Run Redis calls, turning every "Redis did not answer" into FleetUnavailable."""
    try:
        yield
    except _OUTAGES as exc:
        raise FleetUnavailable(f"redis at {target.display}: {doing}: {_reason(exc)}") from exc


def stop_if_cancelled() -> None:
    """Raise CancelledError when the running task was asked to stop.

    redis-py (8.2 on Python 3.11) can lose a cancellation that arrives while it reads:
    its read timeout turns it into a TimeoutError that its retry swallows, and the read
    then waits with no timeout left. The fleet's loops call this at every turn, and
    their owners close the client when a cancelled loop does not end, so a stop always
    ends."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


def _redacted(url: str) -> str:
    """`url` with any password replaced, for error messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if password is None:
        return url
    return url.replace(f":{password}@", ":***@", 1)
