"""Admin API under /admin/: rollout state, actions and the audit log, behind a bearer token.

With ROLLGUARD_ADMIN_TOKEN set, every admin request needs `Authorization: Bearer
<token>`; without one, admin answers only to loopback clients.
"""

from __future__ import annotations

import hmac
import ipaddress
from datetime import datetime

import orjson
from aiohttp import web

from rollguard.proxy.dataplane import json_response
from rollguard.proxy.errors import Forbidden, Unauthorized
from rollguard.proxy.state import ROLLOUTS, SETTINGS, Guard
from rollguard.serving.errors import InvalidInput

ACTIONS = ("rollback", "promote", "pause", "resume", "approve")
ACTOR_HEADER = "x-rollguard-actor"


def _authorise(request: web.Request) -> None:
    token = request.app[SETTINGS].admin_token
    if token:
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
            raise Unauthorized("admin API needs 'Authorization: Bearer <ROLLGUARD_ADMIN_TOKEN>'")
        return
    remote = request.remote or ""
    try:
        loopback = ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise Forbidden("admin API answers loopback clients only while no admin token is set")


async def list_rollouts(request: web.Request) -> web.Response:
    _authorise(request)
    return json_response(request.app[ROLLOUTS].overview())


async def get_rollout(request: web.Request) -> web.Response:
    _authorise(request)
    return json_response(request.app[ROLLOUTS].describe(request.match_info["name"]))


async def act(request: web.Request) -> web.Response:
    _authorise(request)
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
    result = await request.app[ROLLOUTS].act(
        request.match_info["name"], action, actor.strip(), reason or ""
    )
    return json_response(result)


def _when(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"'{name}' {value!r} is not an ISO 8601 date/time") from None


async def audit(request: web.Request) -> web.Response:
    _authorise(request)
    q = request.query
    entries = request.app[ROLLOUTS].audit_entries(
        since=_when(q.get("since"), "since"),
        until=_when(q.get("until"), "until"),
        rollout=q.get("rollout"),
    )
    return json_response({"entries": entries})


def add_routes(app: web.Application, guard: Guard) -> None:
    app.router.add_get("/admin/rollouts", guard(list_rollouts))
    app.router.add_get("/admin/rollouts/{name}", guard(get_rollout))
    app.router.add_post("/admin/rollouts/{name}/{action}", guard(act))
    app.router.add_get("/admin/audit", guard(audit))
