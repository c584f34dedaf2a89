"""The admin port's URL table matches as aiohttp's router did: exact paths, HEAD only where
a route names it, `%2F` kept inside one parameter, 405 naming the methods a path takes."""

from __future__ import annotations

import pytest

from rollguard.proxy.admin_urls import AdminUrls
from rollguard.proxy.errors import MethodNotAllowed, RouteNotFound
from rollguard.proxy.urls import Params, Route
from rollguard.proxy.wire import Request, Response


async def _handler(request: Request, params: Params) -> Response:
    return Response(200)


def _urls() -> AdminUrls:
    routes = [
        ("GET", "/admin/rollouts"),
        ("GET", "/admin/rollouts/{name}"),
        ("POST", "/admin/rollouts/{name}/{action}"),
        ("GET", "/ui"),
        ("HEAD", "/ui"),
    ]
    return AdminUrls([Route(method, path, _handler) for method, path in routes])


@pytest.mark.parametrize(
    ("method", "path", "params"),
    [
        ("GET", "/admin/rollouts", {}),
        ("GET", "/admin/rollouts/fraud", {"name": "fraud"}),
        ("GET", "/admin/rollouts/fr%61ud", {"name": "fraud"}),
        ("GET", "/%61dmin/rollouts/fraud", {"name": "fraud"}),
        ("GET", "/admin/rollouts/a%2Fb", {"name": "a/b"}),
        ("GET", "/admin/rollouts/a%2fb%25c", {"name": "a/b%c"}),
        ("GET", "/admin/rollouts/caf%C3%A9", {"name": "café"}),
        ("POST", "/admin/rollouts/fraud/pause", {"name": "fraud", "action": "pause"}),
        ("HEAD", "/ui", {}),
    ],
)
def test_a_match_and_its_parameters(method: str, path: str, params: Params) -> None:
    assert _urls().match(method, path)[1] == params


@pytest.mark.parametrize(
    "path", ["/admin/rollouts/", "/admin/rollouts/a/b/c/d", "/admin/rollouts/a{b", "/nowhere"]
)
def test_paths_no_route_takes_are_404(path: str) -> None:
    with pytest.raises(RouteNotFound, match="no route for GET"):
        _urls().match("GET", path)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("HEAD", "/admin/rollouts", ("GET",)),
        ("POST", "/admin/rollouts/fraud", ("GET",)),
        ("GET", "/admin/rollouts/fraud/pause", ("POST",)),
        ("POST", "/ui", ("GET", "HEAD")),
    ],
)
def test_a_path_other_methods_take_is_405_naming_them(
    method: str, path: str, allowed: tuple[str, ...]
) -> None:
    with pytest.raises(MethodNotAllowed) as raised:
        _urls().match(method, path)
    assert raised.value.allowed == allowed
    assert str(raised.value) == f"{method} is not allowed here"
