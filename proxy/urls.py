"""The data port's URL table: (method, path pattern) to a handler, with path parameters."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from rollguard.proxy.errors import MethodNotAllowed, RouteNotFound
from rollguard.proxy.wire import Request, Response

Params = dict[str, str]
Handler = Callable[[Request, Params], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    """`pattern` like /v2/models/{model}/infer: literal segments and {name} parameters."""

    method: str
    pattern: str
    handler: Handler

    def segments(self) -> tuple[str, ...]:
        return tuple(self.pattern.strip("/").split("/"))


class Urls:
    """Matches a request's path segment by segment; a parameter takes one whole segment
    (percent-decoded, never empty). Unknown paths raise RouteNotFound, a known path with
    another method MethodNotAllowed naming the allowed ones."""

    CACHED = 1024  # (method, path) pairs whose match is remembered; a full cache starts over

    def __init__(self, routes: Sequence[Route]) -> None:
        # Grouped by segment count, in the order given: the first match wins.
        self._by_length: dict[int, list[tuple[tuple[str, ...], Route]]] = {}
        for route in routes:
            segments = route.segments()
            self._by_length.setdefault(len(segments), []).append((segments, route))
        # A sidecar sees the same few paths over and over: a dict lookup beats matching.
        self._seen: dict[tuple[str, str], tuple[Handler, Params]] = {}

    def match(self, method: str, path: str) -> tuple[Handler, Params]:
        """The handler and the path's parameters (shared: callers must not change them)."""
        key = (method, path)
        found = self._seen.get(key)
        if found is None:
            found = self._match(method, path)
            if len(self._seen) >= self.CACHED:
                self._seen.clear()
            self._seen[key] = found
        return found

    def _match(self, method: str, path: str) -> tuple[Handler, Params]:
        parts = path.strip("/").split("/")  # `/v2/` is `/v2`, as the spec lists both
        allowed: list[str] = []
        for segments, route in self._by_length.get(len(parts), ()):
            params = _bind(segments, parts)
            if params is None:
                continue
            # HEAD is GET without the body (the connection leaves the body out).
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route.handler, params
            allowed.append(route.method)
            if route.method == "GET":
                allowed.append("HEAD")
        if allowed:
            raise MethodNotAllowed(
                f"{method} is not allowed for {path}; use {', '.join(sorted(set(allowed)))}",
                tuple(sorted(set(allowed))),
            )
        raise RouteNotFound(f"no route for {method} {path}")


def _bind(segments: tuple[str, ...], parts: list[str]) -> Params | None:
    params: Params = {}
    for want, got in zip(segments, parts, strict=True):
        if want[0] == "{":
            if not got:
                return None
            params[want[1:-1]] = unquote(got, errors="surrogateescape") if "%" in got else got
        elif want != got:
            return None
    return params
