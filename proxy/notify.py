"""Webhook notifications of rollout decisions: JSON POSTs with retries, never awaited inline.

A webhook is an outgoing request the gateway makes on a policy author's word, from
the gateway's own address, so it is held to the operator's limits at send time:
- its host must be in `webhook_allowed_hosts` (the loader refuses other policies; this
  checks again);
- its name is resolved here, every address checked, and the connection made to the
  checked address (a name that changes its answer between check and connect, DNS
  rebinding, gains nothing): never a port the gateway listens on (data, admin: the
  gateway adds each listener's port to `own_ports`) at any of this machine's addresses,
  never a link-local address (cloud metadata) unless the operator listed that address;
- redirects are never followed (a 3xx is a failed delivery, not retried);
- headers named in `headers_from_env` take their values from the gateway's
  environment; a variable that is unset fails the delivery, naming the variable.

aiohttp, the HTTP client, is imported with the first delivery: a gateway that sends no
webhook never pays its memory (about 10 MiB with the TLS context it builds).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from prometheus_client import Counter

from rollguard.policy import webhooks
from rollguard.policy.schema import Webhook

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("rollguard.notify")

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
RESULTS = ("delivered", "failed", "refused", "dropped")


class Refused(Exception):
    """This delivery may not be made (and retrying will not change that)."""


class Unresolved(OSError):
    """The webhook's host name resolves to no address; retried as a failed connection."""


class Notifier:
    """Sends each decision to a rollout's webhooks in background tasks.

    `send` returns at once: delivery (with exponential back-off between retries and a
    per-attempt timeout) happens in tracked tasks so the decision loop never waits.
    `own_ports`: the gateway's listening ports, read at each delivery (the gateway adds
    a port as soon as it listens on it, so the collection is kept, not copied).
    Its HTTP client is made for the first delivery and closed by `close`.
    """

    def __init__(
        self,
        *,
        allowed_hosts: Sequence[str] = (),
        own_ports: Collection[int] = (),
        environ: Mapping[str, str] | None = None,
        counter: Counter | None = None,
        max_pending: int = 1000,
    ) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._allowed = tuple(allowed_hosts)
        self._own_ports = own_ports
        self._environ = os.environ if environ is None else environ
        self._tasks: set[asyncio.Task[None]] = set()
        self._max_pending = max_pending
        self._counter = counter  # rollguard_webhook_deliveries_total, by result
        self.counts = dict.fromkeys(RESULTS, 0)

    def send(self, hooks: Sequence[Webhook], payload: Mapping[str, Any]) -> None:
        body = orjson.dumps(dict(payload), option=orjson.OPT_SERIALIZE_NUMPY, default=str)
        for hook in hooks:
            if len(self._tasks) >= self._max_pending:
                self._count("dropped")
                log.warning(
                    "webhook %s dropped: %d deliveries pending", hook.webhook, len(self._tasks)
                )
                continue
            task = asyncio.get_running_loop().create_task(self._deliver(hook, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, hook: Webhook, body: bytes) -> None:
        import aiohttp  # imported on first use: see the module's docstring

        if self._session is None:
            self._session = aiohttp.ClientSession()
        session = self._session
        delay = 0.2
        problem = "not attempted"
        for attempt in range(hook.retries + 1):
            try:
                url, headers, server_hostname = await self._prepare(hook)
                async with session.post(
                    url,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=hook.timeout),
                    allow_redirects=False,
                    server_hostname=server_hostname,
                ) as resp:
                    if resp.status < 300:
                        self._count("delivered")
                        return
                    if resp.status < 400:
                        raise Refused(f"answered {resp.status} (a redirect; not followed)")
                    problem = f"HTTP {resp.status}"
            except Refused as exc:
                self._count("refused")
                log.warning("webhook %s not delivered: %s", hook.webhook, exc)
                return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < hook.retries:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._count("failed")
        log.warning(
            "webhook %s failed after %d attempts: %s", hook.webhook, hook.retries + 1, problem
        )

    def _count(self, result: str) -> None:
        self.counts[result] += 1
        if self._counter is not None:
            self._counter.labels(result).inc()

    async def _prepare(self, hook: Webhook) -> tuple[str, dict[str, str], str | None]:
        """The URL to post to (its host replaced by a checked address), headers, TLS name."""
        try:
            host, port = webhooks.destination(hook.webhook)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        if not webhooks.allowed(host, port, self._allowed):
            raise Refused(f"host {host!r} is not in webhook_allowed_hosts")
        headers = {"Content-Type": "application/json"}
        for name, variable in hook.headers_from_env.items():
            value = self._environ.get(variable)
            if not value:
                raise Refused(f"environment variable {variable} (header {name}) is not set")
            headers[name] = value
        address = await self._checked_address(host, port)
        parts = urlsplit(hook.webhook)
        literal = f"[{address}]" if address.version == 6 else str(address)
        netloc = f"{literal}:{port}"
        headers["Host"] = parts.netloc  # as the URL wrote it (no credentials: refused above)
        url = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        return url, headers, host if parts.scheme == "https" else None

    async def _checked_address(self, host: str, port: int) -> _Address:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise Unresolved(f"cannot resolve {host!r}: {exc}") from None
        addresses = [_address(str(info[4][0])) for info in infos]
        if not addresses:
            raise Unresolved(f"{host!r} resolves to no address")
        for address in addresses:
            if port in self._own_ports and is_local(address):
                raise Refused(
                    f"{host}:{port} is this gateway's own port (at {address}); webhooks "
                    "never call the gateway itself"
                )
            if address.is_link_local and not webhooks.listed_literally(host, self._allowed):
                raise Refused(
                    f"{host} resolves to the link-local address {address} (cloud metadata "
                    "lives there); list the address itself in webhook_allowed_hosts to allow it"
                )
        return addresses[0]

    async def close(self, wait_s: float = 2.0) -> None:
        """Let deliveries under way finish within `wait_s` (the rest are cancelled), then
        close the HTTP client if one was made."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=wait_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


def _address(text: str) -> _Address:
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_local(address: _Address) -> bool:
    """Whether connecting to `address` reaches this machine (so maybe this process)."""
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(address), 0))  # only this machine's own addresses can be bound
    except OSError:
        return False
    return True
