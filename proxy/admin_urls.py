"""The admin port's URL table: (method, path template) to a handler, matched by aiohttp's rules.

The admin port was an aiohttp application; its clients (the CLI, the dashboard, scripts)
see the same matching now that it runs on rollguard's own server. Unlike the data
port's table (proxy/urls.py):
- a path matches its template exactly: `/admin/rollouts/` is not `/admin/rollouts`;
- a method matches only where a route names it (HEAD too: the dashboard's routes do);
- the path is percent-decoded before matching, except `%2F` and `%25`, which a path
  parameter decodes in turn: `/admin/rollouts/a%2Fb` names the rollout `a/b`;
- a parameter takes one segment without `{` or `}`, never empty.
No route for the path raises RouteNotFound; a path other methods take, MethodNotAllowed
naming them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import unquote

from rollguard.proxy.errors import MethodNotAllowed, RouteNotFound
from rollguard.proxy.urls import Handler, Params, Route

_PARAMETER = re.compile(r"\{([_a-zA-Z][_a-zA-Z0-9]*)\}")
_KEPT = re.compile(r"(%2[fF]|%25)")  # a slash and a percent sign stay encoded


class AdminUrls:
    """The first route whose template and method match, in the order given."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = [(_template(route.pattern), route) for route in routes]

    def match(self, method: str, path: str) -> tuple[Handler, Params]:
        """The handler and the path's parameters; `path` as it came, percent-encoded."""
        safe = _path_safe(path)
        allowed: set[str] = set()
        for template, route in self._routes:
            found = template.fullmatch(safe)
            if found is None:
                continue
            if route.method == method:
                params = {name: _unquote_parameter(v) for name, v in found.groupdict().items()}
                return route.handler, params
            allowed.add(route.method)
        if allowed:
            raise MethodNotAllowed(f"{method} is not allowed here", tuple(sorted(allowed)))
        raise RouteNotFound(f"no route for {method} {unquote(path)}")


def _template(pattern: str) -> re.Pattern[str]:
    """`/admin/rollouts/{name}` as a regular expression with a group per parameter."""
    parts = _PARAMETER.split(pattern)  # literal, name, literal, name, ...
    pieces = [f"(?P<{p}>[^{{}}/]+)" if i % 2 else re.escape(p) for i, p in enumerate(parts)]
    return re.compile("".join(pieces))


def _path_safe(path: str) -> str:
    """`path` decoded but for `%2F` and `%25` (upper-cased); escapes that are not UTF-8
    stay as they came."""
    if "%" not in path:
        return path
    pieces = _KEPT.split(path)  # UTF-8 sequences never hold the bytes 0x2F or 0x25
    return "".join(piece.upper() if i % 2 else _decoded(piece) for i, piece in enumerate(pieces))


def _decoded(piece: str) -> str:
    try:
        return unquote(piece, errors="strict")
    except UnicodeDecodeError:
        return piece


def _unquote_parameter(value: str) -> str:
    return value.replace("%2F", "/").replace("%25", "%") if "%" in value else value
