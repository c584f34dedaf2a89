"""The admin port: an aiohttp application for /admin/ (rollouts, actions, audit) and /metrics.

It binds to loopback by default, apart from the data port, as sidecars users know do
(Envoy's admin port, Linkerd's 4191, MLServer's and Triton's metrics ports). With
ROLLGUARD_ADMIN_TOKEN set, every /admin/ request needs `Authorization: Bearer <token>`;
without one, /admin/ answers loopback clients only. Errors map through the same table
as the data port's (proxy/errors.py).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from datetime import datetime

import orjson
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rollguard.proxy.endpoints import error_response, json_response
from rollguard.proxy.errors import Forbidden, MethodNotAllowed, RouteNotFound, Unauthorized
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.rollouts import Rollouts
from rollguard.proxy.wire import SERVER, Response
from rollguard.serving.errors import InvalidInput

ACTIONS = ("rollback", "promote", "pause", "resume", "approve")
ACTOR_HEADER = "x-rollguard-actor"

Handler = Callable[[web.Request], Awaitable[Response]]


class Admin:
    """The admin routes over the rollouts and the metrics registry."""

    def __init__(self, rollouts: Rollouts, metrics: Metrics, token: str | None) -> None:
        self.rollouts = rollouts
        self.metrics = metrics
        self.token = token

    def application(self) -> web.Application:
        app = web.Application()
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/admin/rollouts", self.list_rollouts),
            ("GET", "/admin/rollouts/{name}", self.get_rollout),
            ("POST", "/admin/rollouts/{name}/{action}", self.act),
            ("GET", "/admin/audit", self.audit),
            ("GET", "/metrics", self.scrape),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, _answering(handler), name=None)
        app.router.add_route("*", "/{tail:.*}", _answering(_unmatched))
        app.on_response_prepare.append(_server_header)
        return app

    def _authorise(self, request: web.Request) -> None:
        if self.token:
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                value.encode(), self.token.encode()
            ):
                raise Unauthorized(
                    "admin API needs 'Authorization: Bearer <ROLLGUARD_ADMIN_TOKEN>'"
                )
            return
        remote = request.remote or ""
        try:
            loopback = ipaddress.ip_address(remote.split("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise Forbidden("admin API answers loopback clients only while no admin token is set")

    async def list_rollouts(self, request: web.Request) -> Response:
        self._authorise(request)
        return json_response(self.rollouts.overview())

    async def get_rollout(self, request: web.Request) -> Response:
        self._authorise(request)
        return json_response(self.rollouts.describe(request.match_info["name"]))

    async def act(self, request: web.Request) -> Response:
        self._authorise(request)
        action = request.match_info["action"]
        if action not in ACTIONS:
            raise InvalidInput(f"unknown action {action!r}; expected one of {list(ACTIONS)}")
        body = await request.read()
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
        result = await self.rollouts.act(
            request.match_info["name"], action, actor.strip(), reason or ""
        )
        return json_response(result)

    async def audit(self, request: web.Request) -> Response:
        self._authorise(request)
        q = request.query
        entries = self.rollouts.audit_entries(
            since=_when(q.get("since"), "since"),
            until=_when(q.get("until"), "until"),
            rollout=q.get("rollout"),
        )
        return json_response({"entries": entries})

    async def scrape(self, request: web.Request) -> Response:
        return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)


def _when(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"'{name}' {value!r} is not an ISO 8601 date/time") from None


async def _unmatched(request: web.Request) -> Response:
    """Every path no route takes: 405 naming the allowed methods, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is request.match_info.route.resource:
            continue
        _, methods = await resource.resolve(request)
        allowed |= methods
    if allowed:
        raise MethodNotAllowed(f"{request.method} is not allowed here", tuple(sorted(allowed)))
    raise RouteNotFound(f"no route for {request.method} {request.path}")


def _answering(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler for one of ours: its Response, or its error mapped by the table."""

    async def answer(request: web.Request) -> web.Response:
        try:
            response = await handler(request)
        except Exception as exc:
            request_id = request.headers.get("x-request-id")
            response = error_response(exc, request_id, f"{request.method} {request.path}")
        out = web.Response(body=response.body, status=response.status)
        if response.content_type is not None:
            out.headers["Content-Type"] = response.content_type
        for name, value in response.headers or ():
            out.headers[name] = value
        return out

    return answer


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER  # not aiohttp's and Python's versions
