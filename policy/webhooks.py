"""Where a webhook may go: its URL's host and port, and the operator's allow-list.

Policies name webhook URLs; the operator's `webhook_allowed_hosts` setting says which
hosts they may reach. An entry is `host` (any port), `host:port`, `*.domain` (any
subdomain of it) or an IP address (`10.0.0.5`, `10.0.0.5:9000`, `[::1]:9000`). Names
are compared as written, case-insensitively: `127.1` is not `127.0.0.1`. An empty
list allows nothing. The gateway checks again where a name resolves to when it sends
(proxy/notify.py); this module only reads text.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

_HEADER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by the notifier itself, or framing that a header from the environment must not change.
_RESERVED = {"host", "content-type", "content-length", "transfer-encoding", "connection"}
_DEFAULT_PORTS = {"http": 80, "https": 443}


def destination(url: str) -> tuple[str, int]:
    """The (host, port) an http(s) URL points at; ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError(
            "a webhook URL must not carry credentials (user:password@); "
            "send them with headers_from_env"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    host = _canonical(parts.hostname or "")
    if not host:
        raise ValueError(f"{url!r} names no host")
    return host, port if port is not None else _DEFAULT_PORTS[parts.scheme]


def allowed(host: str, port: int, entries: Iterable[str]) -> bool:
    """Whether (host, port) matches one of the operator's allow-list entries."""
    host = _canonical(host)
    for entry in entries:
        pattern, want_port = _entry(entry)
        if want_port is not None and want_port != port:
            continue
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and host != pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


def listed_literally(host: str, entries: Iterable[str]) -> bool:
    """Whether `host` is an IP address that an entry names exactly (not through a name)."""
    host = _canonical(host)
    return _is_ip(host) and any(_entry(e)[0] == host for e in entries)


def check_headers_from_env(headers: dict[str, str]) -> dict[str, str]:
    """Header name -> environment variable name, each checked; ValueError otherwise."""
    for name, variable in headers.items():
        if not _HEADER.match(name):
            raise ValueError(f"{name!r} is not an HTTP header name")
        if name.lower() in _RESERVED:
            raise ValueError(f"header {name!r} is set by rollguard and cannot come from env")
        if not _ENV.match(variable):
            raise ValueError(
                f"{variable!r} (for header {name!r}) is not an environment variable name; "
                "the policy names the variable, the gateway's environment holds the secret"
            )
    return headers


def _entry(entry: str) -> tuple[str, int | None]:
    """An allow-list entry as (host or *.domain, port or None)."""
    text = entry.strip().lower()
    if text.startswith("["):  # [v6] or [v6]:port
        address, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return _canonical(address), int(port) if port.isdigit() else None
    if text.count(":") == 1:
        name, _, port = text.partition(":")
        return _canonical(name), int(port) if port.isdigit() else -1  # -1: matches nothing
    return _canonical(text), None


def _canonical(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:  # an IPv6 literal: one spelling of it
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return host
    return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
