"""The rollout dashboard at /ui on the admin port: a static page that reads the admin API.

The page, its script and its style ship as package data (proxy/ui/) and are read once,
at start: no CDN, no build step, no network at run time. They hold no data, so they are
served without credentials; everything the page shows comes from /admin/ with the
`Authorization: Bearer` header the page's script adds from the token the operator typed
into it (kept in the tab's sessionStorage, never in a URL). The Content-Security-Policy
allows only this origin's script, style and fetches, no inline script and no framing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib.resources import files

from aiohttp import web

log = logging.getLogger("rollguard")

_ASSETS = {  # file name -> content type
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def add_routes(app: web.Application) -> None:
    """GET /ui (and /ui/) answers the page, /ui/<asset> its script and style."""
    folder = files("rollguard.proxy").joinpath("ui")
    try:
        assets = {name: folder.joinpath(name).read_bytes() for name in _ASSETS}
    except OSError as exc:  # a broken install: the admin API and /metrics still serve
        log.error("dashboard files missing (%s): /ui answers 404", exc)
        return

    def serving(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        body, content_type = assets[name], _ASSETS[name]

        async def answer(request: web.Request) -> web.Response:
            response = web.Response(body=body, headers=_HEADERS)
            response.headers["Content-Type"] = content_type
            return response

        return answer

    app.router.add_get("/ui", serving("index.html"))
    app.router.add_get("/ui/", serving("index.html"))
    for name in _ASSETS:
        app.router.add_get(f"/ui/{name}", serving(name))
