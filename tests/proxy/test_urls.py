"""The data port's URL table: matching, path parameters, 404 against 405."""

from __future__ import annotations

import string
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollguard.proxy.errors import MethodNotAllowed, RouteNotFound
from rollguard.proxy.urls import Params, Route, Urls
from rollguard.proxy.wire import Request, Response


async def infer(request: Request, params: Params) -> Response:
    return Response(200)


async def pinned_infer(request: Request, params: Params) -> Response:
    return Response(200)


async def metadata(request: Request, params: Params) -> Response:
    return Response(200)


async def server(request: Request, params: Params) -> Response:
    return Response(200)


async def put_item(request: Request, params: Params) -> Response:
    return Response(200)


async def get_item(request: Request, params: Params) -> Response:
    return Response(200)


def _urls() -> Urls:
    return Urls(
        [
            Route("POST", "/v2/models/{model}/infer", infer),
            Route("POST", "/v2/models/{model}/versions/{version}/infer", pinned_infer),
            Route("GET", "/v2/models/{model}", metadata),
            Route("GET", "/v2", server),
            Route("PUT", "/items/{id}", put_item),
            Route("GET", "/items/{id}", get_item),
        ]
    )


def test_literal_and_parameter_routes_match() -> None:
    urls = _urls()
    assert urls.match("GET", "/v2") == (server, {})
    assert urls.match("POST", "/v2/models/fraud/infer") == (infer, {"model": "fraud"})
    assert urls.match("POST", "/v2/models/fraud/versions/1.0.0/infer") == (
        pinned_infer,
        {"model": "fraud", "version": "1.0.0"},
    )
    assert urls.match("GET", "/v2/models/fraud") == (metadata, {"model": "fraud"})


def test_parameters_are_percent_decoded_one_whole_segment() -> None:
    urls = _urls()
    assert urls.match("POST", "/v2/models/fr%61ud/infer")[1] == {"model": "fraud"}
    assert urls.match("POST", "/v2/models/a%2Fb/infer")[1] == {"model": "a/b"}  # not a split
    assert urls.match("POST", "/v2/models/caf%C3%A9/infer")[1] == {"model": "café"}
    assert urls.match("POST", "/v2/models/100%25/infer")[1] == {"model": "100%"}
    assert urls.match("POST", "/v2/models/1%2E0/versions/2%2E0/infer")[1] == {
        "model": "1.0",
        "version": "2.0",
    }
    # Not valid UTF-8 once decoded: kept as surrogate escapes, never an exception.
    model = urls.match("POST", "/v2/models/%FF/infer")[1]["model"]
    assert model.encode("utf-8", "surrogateescape") == b"\xff"


def test_empty_segment_is_not_a_parameter() -> None:
    urls = _urls()
    with pytest.raises(RouteNotFound):
        urls.match("POST", "/v2/models//infer")
    with pytest.raises(RouteNotFound):
        urls.match("POST", "/v2/models//versions/1/infer")
    with pytest.raises(RouteNotFound):
        urls.match("GET", "/items//")


def test_trailing_and_leading_slashes_are_the_same_path() -> None:
    urls = _urls()
    assert urls.match("GET", "/v2/") == (server, {})  # the V2 spec lists /v2 and /v2/
    assert urls.match("POST", "/v2/models/fraud/infer/") == (infer, {"model": "fraud"})
    assert urls.match("GET", "/v2/models/fraud/") == (metadata, {"model": "fraud"})


def test_unknown_path_is_404_and_known_path_other_method_405() -> None:
    urls = _urls()
    for method, path in [
        ("GET", "/"),
        ("GET", "/v3"),
        ("POST", "/v2/models/fraud/infer/more"),
        ("POST", "/v2/models/fraud/predict"),
        ("GET", "/metrics"),
    ]:
        with pytest.raises(RouteNotFound):
            urls.match(method, path)
    with pytest.raises(MethodNotAllowed) as info:
        urls.match("GET", "/v2/models/fraud/infer")
    assert info.value.allowed == ("POST",)
    with pytest.raises(MethodNotAllowed) as info:
        urls.match("POST", "/v2")
    assert info.value.allowed == ("GET", "HEAD")
    with pytest.raises(MethodNotAllowed) as info:
        urls.match("DELETE", "/items/7")
    assert info.value.allowed == ("GET", "HEAD", "PUT")  # every method the path takes, sorted
    assert "DELETE" in str(info.value) and "GET, HEAD, PUT" in str(info.value)
    assert urls.match("PUT", "/items/7") == (put_item, {"id": "7"})
    assert urls.match("GET", "/items/7") == (get_item, {"id": "7"})


def test_first_matching_route_wins() -> None:
    urls = Urls([Route("GET", "/a/{x}", get_item), Route("GET", "/a/b", server)])
    assert urls.match("GET", "/a/b") == (get_item, {"x": "b"})


def test_answers_stay_right_past_the_cache() -> None:
    urls = _urls()
    for i in range(Urls.CACHED * 2 + 3):
        assert urls.match("POST", f"/v2/models/m{i}/infer") == (infer, {"model": f"m{i}"})
    with pytest.raises(MethodNotAllowed):  # errors are not remembered as matches
        urls.match("GET", "/v2/models/m1/infer")
    with pytest.raises(MethodNotAllowed):
        urls.match("GET", "/v2/models/m1/infer")
    assert urls.match("POST", "/v2/models/m1/infer") == (infer, {"model": "m1"})


_URL_SAFE = string.ascii_letters + string.digits + "-._~"
_names = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30)


@given(st.text(alphabet=_URL_SAFE, min_size=1, max_size=40))
def test_any_url_safe_model_name_matches_as_is(name: str) -> None:
    handler, params = _urls().match("POST", f"/v2/models/{name}/infer")
    assert handler is infer and params == {"model": name}


@given(_names)
def test_any_percent_encoded_model_name_decodes_to_itself(name: str) -> None:
    urls = _urls()
    path = f"/v2/models/{quote(name, safe='')}/infer"
    for _ in range(2):  # matched, then remembered
        handler, params = urls.match("POST", path)
        assert handler is infer and params == {"model": name}


@given(_names, _names)
def test_any_percent_encoded_model_and_version(name: str, version: str) -> None:
    path = f"/v2/models/{quote(name, safe='')}/versions/{quote(version, safe='')}/infer"
    handler, params = _urls().match("POST", path)
    assert handler is pinned_infer and params == {"model": name, "version": version}
