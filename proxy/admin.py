"""The admin port: /admin/ (rollouts, actions, audit), /metrics and the rollout dashboard
/ui (proxy/dashboard.py), which reads /admin/ with the token. It is served by the same
HTTP/1.1 server as the data port (proxy/protocol.py) with its own, smaller limits
(`capacity`, `MAX_BODY_BYTES`); its URL table matches as aiohttp's did (proxy/admin_urls.py).

It binds to loopback by default, apart from the data port, as sidecars users know do
(Envoy's admin port, Linkerd's 4191, MLServer's and Triton's metrics ports).

Authentication is on unless the operator turns it off (`admin_auth: none`): every
/admin/ request needs `Authorization: Bearer <ROLLGUARD_ADMIN_TOKEN>` (at least 16
characters; an empty or short token refuses to start). No or malformed credentials
answer 401 with `WWW-Authenticate`, a wrong token 403; a client that fails
`LOCKOUT_LIMIT` times within `LOCKOUT_WINDOW_S` gets 429 with `Retry-After`. Tokens
are compared in constant time. Without a token, /admin/ answers loopback clients only.
/metrics stays open (Prometheus scrapers rarely carry tokens) unless
`metrics_auth: token`. Errors map through the same table as the data port's
(proxy/errors.py).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from datetime import datetime
from urllib.parse import parse_qs

import orjson
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rollguard.proxy import dashboard
from rollguard.proxy.admin_urls import AdminUrls
from rollguard.proxy.capacity import Capacity
from rollguard.proxy.endpoints import (
    REQUEST_ID,
    checked_request_id,
    echoable,
    error_response,
    json_response,
)
from rollguard.proxy.errors import Forbidden, ProxyError, RateLimited, Unauthorized
from rollguard.proxy.lockout import Lockout
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.rollouts import Rollouts
from rollguard.proxy.settings import Settings, SettingsError
from rollguard.proxy.urls import Params, Route
from rollguard.proxy.wire import Request, Response
from rollguard.serving.errors import InvalidInput

ACTIONS = ("rollback", "promote", "pause", "resume", "approve")
ACTOR_HEADER = "x-rollguard-actor"
MAX_REASON_CHARS = 1000  # an operator's reason or name, as kept in the audit log
MIN_TOKEN_CHARS = 16
LOCKOUT_LIMIT = 10  # failed credentials per client address ...
LOCKOUT_WINDOW_S = 60.0  # ... within this many seconds, then 429 until the oldest ages out
_REALM = 'Bearer realm="rollguard admin"'
# The admin port's limits. Its clients are few (the CLI, a dashboard tab or two holding
# about six connections each, a scraper), all behind one loopback address by default, so
# there is no per-client cap; its connections fit in the descriptors the data port leaves
# (gateway.FD_RESERVE). Bodies are small JSON: 1 MiB each (aiohttp's client_max_size,
# the admin port's limit so far), at most 8 arriving at once.
MAX_BODY_BYTES = 1024 * 1024
MAX_CONNECTIONS = 64
MAX_ARRIVING = 8


def capacity() -> Capacity:
    """The admin port's connection and body-buffer bounds (see MAX_CONNECTIONS)."""
    return Capacity(
        max_connections=MAX_CONNECTIONS,
        max_connections_per_client=0,
        max_buffered_bytes=MAX_ARRIVING * MAX_BODY_BYTES,
        max_inflight=MAX_ARRIVING,
    )


def admin_token(settings: Settings) -> str | None:
    """The token admin requires, or None when the operator chose `admin_auth: none`.

    SettingsError, naming what to do, for a missing, empty, short or unsendable token,
    or a token given together with `admin_auth: none`.
    """
    token = settings.admin_token
    if settings.admin_auth == "none":
        if token:
            raise SettingsError(
                "admin_auth is 'none' but ROLLGUARD_ADMIN_TOKEN is set; unset one of them"
            )
        if settings.metrics_auth == "token":
            raise SettingsError("metrics_auth 'token' needs ROLLGUARD_ADMIN_TOKEN")
        return None
    hint = (
        f"at least {MIN_TOKEN_CHARS} characters, e.g. from "
        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
    )
    if token is None:
        raise SettingsError(
            f"the admin API needs a token: set ROLLGUARD_ADMIN_TOKEN ({hint}), or set "
            "admin_auth: none (ROLLGUARD_ADMIN_AUTH=none) to run admin without one"
        )
    if token == "":
        raise SettingsError(f"ROLLGUARD_ADMIN_TOKEN is set but empty; give a token of {hint}")
    if len(token) < MIN_TOKEN_CHARS:
        raise SettingsError(f"ROLLGUARD_ADMIN_TOKEN has {len(token)} characters; it needs {hint}")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise SettingsError(
            "ROLLGUARD_ADMIN_TOKEN must be printable ASCII without spaces (it is sent "
            "in an HTTP header)"
        )
    return token


class Admin:
    """The admin routes over the rollouts and the metrics registry."""

    def __init__(self, rollouts: Rollouts, metrics: Metrics, settings: Settings) -> None:
        self.rollouts = rollouts
        self.metrics = metrics
        token = admin_token(settings)
        # Digests of equal length: comparing them leaks neither content nor length.
        self._digest = None if token is None else hashlib.sha256(token.encode()).digest()
        self._metrics_open = settings.metrics_auth == "none"
        self.lockout = Lockout(limit=LOCKOUT_LIMIT, window_s=LOCKOUT_WINDOW_S)
        self._urls = AdminUrls(
            [
                Route("GET", "/admin/rollouts", self.list_rollouts),
                Route("GET", "/admin/rollouts/{name}", self.get_rollout),
                Route("POST", "/admin/rollouts/{name}/{action}", self.act),
                Route("GET", "/admin/audit", self.audit),
                Route("GET", "/metrics", self.scrape),
                *dashboard.routes(),
            ]
        )

    async def handle(self, request: Request) -> Response:
        """The answer to any request of the admin port, errors included; never raises."""
        given = request.headers.get(REQUEST_ID)
        if given is not None:  # refused as on the data port
            try:
                checked_request_id(given)
            except InvalidInput as error:
                return error_response(error, None, "admin port")
        try:
            handler, params = self._urls.match(request.method, request.path)
            return await handler(request, params)
        except Exception as exc:
            return error_response(exc, given, f"admin port: {request.method} {request.path}")

    def refuse(self, error: ProxyError, headers: Mapping[str, str]) -> Response:
        """The answer to a request that could not be read (malformed, too large, late)."""
        given = headers.get(REQUEST_ID)
        request_id = given if given is not None and echoable(given) else None
        return error_response(error, request_id, "admin port: reading a request")

    def _authorise(self, request: Request) -> None:
        client = request.peer
        if self._digest is None:
            if not _loopback(client):
                raise Forbidden("admin API answers loopback clients only while admin_auth is none")
            return
        wait = self.lockout.retry_after(client)
        if wait is not None:
            raise RateLimited(
                f"too many failed admin credentials from this client; retry in {wait}s", wait
            )
        given = request.headers.get("authorization")  # names are lower-case
        if given is None:
            raise Unauthorized(
                "admin API needs 'Authorization: Bearer <ROLLGUARD_ADMIN_TOKEN>'", _REALM
            )
        scheme, _, value = given.strip().partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value or " " in value:
            self.lockout.failed(client)
            raise Unauthorized(
                "malformed Authorization header; expected 'Bearer <token>'",
                f'{_REALM}, error="invalid_request"',
            )
        digest = hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()
        if not hmac.compare_digest(digest, self._digest):
            self.lockout.failed(client)
            raise Forbidden("the admin token is not the one this gateway was started with")

    async def list_rollouts(self, request: Request, params: Params) -> Response:
        self._authorise(request)
        return json_response(self.rollouts.overview())

    async def get_rollout(self, request: Request, params: Params) -> Response:
        self._authorise(request)
        return json_response(self.rollouts.describe(params["name"]))

    async def act(self, request: Request, params: Params) -> Response:
        self._authorise(request)
        action = params["action"]
        if action not in ACTIONS:
            raise InvalidInput(f"unknown action {action!r}; expected one of {list(ACTIONS)}")
        body = request.body
        doc = {}
        if body.strip():
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise InvalidInput(f"action body is not valid JSON: {exc}") from None
            if not isinstance(doc, dict):
                raise InvalidInput("action body must be a JSON object")
        actor = doc.get("actor") or request.headers.get(ACTOR_HEADER)
        if not isinstance(actor, str) or not actor.strip():
            raise InvalidInput(f"say who acts: body {{'actor': NAME}} or header {ACTOR_HEADER}")
        reason = doc.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise InvalidInput("'reason' must be a string")
        if reason is not None and len(reason) > MAX_REASON_CHARS:
            raise InvalidInput(f"'reason' is longer than {MAX_REASON_CHARS} characters")
        if len(actor) > MAX_REASON_CHARS:
            raise InvalidInput(f"'actor' is longer than {MAX_REASON_CHARS} characters")
        # One line each: they go into the gateway log as they are, where a newline would
        # let a token holder forge log lines.
        for field, text in (("actor", actor), ("reason", reason or "")):
            if not text.isprintable():
                raise InvalidInput(f"'{field}' must not contain control characters (newlines)")
        result = await self.rollouts.act(params["name"], action, actor.strip(), reason or "")
        return json_response(result)

    async def audit(self, request: Request, params: Params) -> Response:
        self._authorise(request)
        q = {name: values[0] for name, values in _query(request.query).items()}
        entries = await self.rollouts.read_audit(
            since=_when(q.get("since"), "since"),
            until=_when(q.get("until"), "until"),
            rollout=q.get("rollout"),
        )
        return json_response({"entries": entries, "chain": self.rollouts.audit_status()})

    async def scrape(self, request: Request, params: Params) -> Response:
        if not self._metrics_open:
            self._authorise(request)
        return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)


def _loopback(remote: str) -> bool:
    try:
        return ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        return False


def _query(query: str) -> dict[str, list[str]]:
    """A query string's values by name, in order (blank values kept, as aiohttp did)."""
    return parse_qs(query, keep_blank_values=True) if query else {}


def _when(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"'{name}' {value!r} is not an ISO 8601 date/time") from None
