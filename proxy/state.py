"""Typed keys for what the aiohttp application shares between handlers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from rollguard.proxy.settings import Settings

if TYPE_CHECKING:
    from rollguard.proxy.inference import Inference
    from rollguard.proxy.rollouts import Rollouts

VARIANT_HEADER = "x-rollguard-variant"
REQUEST_ID_HEADER = "x-request-id"

SETTINGS = web.AppKey("settings", Settings)
GATEWAY: web.AppKey[Inference] = web.AppKey("gateway")
ROLLOUTS: web.AppKey[Rollouts] = web.AppKey("rollouts")
# The request's id as known so far: the x-request-id header, then the body's id.
REQUEST_ID: web.RequestKey[str | None] = web.RequestKey("request_id")

# A request handler, and what wraps one with limits and error mapping (proxy/app.py).
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Guard = Callable[[Handler], Handler]
