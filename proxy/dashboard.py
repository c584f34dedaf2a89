"""The rollout dashboard at /ui on the admin port: a static page that reads the admin API.

The page, its script and its style ship as package data (proxy/ui/) and are read once,
at start: no CDN, no build step, no network at run time. They hold no data, so they are
served without credentials; everything the page shows comes from /admin/ with the
`Authorization: Bearer` header the page's script adds from the token the operator typed
into it (kept in the tab's sessionStorage, never in a URL). The Content-Security-Policy
allows only this origin's script, style and fetches, no inline script and no framing;
these headers take the place of the stricter ones every other answer has (proxy/wire.py).
"""

from __future__ import annotations

import logging
from importlib.resources import files

from rollguard.proxy.urls import Handler, Params, Route
from rollguard.proxy.wire import Request, Response

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


def routes() -> list[Route]:
    """GET (and HEAD) /ui and /ui/ answer the page, /ui/<asset> its script and style;
    none when the files are missing."""
    folder = files("rollguard.proxy").joinpath("ui")
    try:
        assets = {name: folder.joinpath(name).read_bytes() for name in _ASSETS}
    except OSError as exc:  # a broken install: the admin API and /metrics still serve
        log.error("dashboard files missing (%s): /ui answers 404", exc)
        return []

    def serving(name: str) -> Handler:
        body, content_type = assets[name], _ASSETS[name]
        headers = list(_HEADERS.items())

        async def answer(request: Request, params: Params) -> Response:
            return Response(200, body, content_type, list(headers), own_security=True)

        return answer

    paths = {"/ui": "index.html", "/ui/": "index.html"} | {f"/ui/{n}": n for n in _ASSETS}
    return [
        Route(method, path, serving(name))
        for path, name in paths.items()
        for method in ("GET", "HEAD")  # the connection leaves a HEAD's body out
    ]
