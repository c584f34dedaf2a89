"""Data-plane HTTP handlers: Open Inference Protocol (V2) REST, /predict and feedback.

Handlers only do HTTP: read the body, call the codec and the inference service, write the answer.
Errors propagate to the guard in proxy/app.py, which maps them through proxy/guard.py.
V2 infer lives in `infer_core`, which the aiohttp handler and the fast path
(proxy/fastpath.py) both call, and maps its own errors through the same proxy/guard.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from http.cookies import CookieError, SimpleCookie
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web

from rollguard.proxy.errors import FeedbackUnknown
from rollguard.proxy.guard import JSON, Reply, reply_for
from rollguard.proxy.inference import Answer, Inference
from rollguard.proxy.routing import KeySource
from rollguard.proxy.state import (
    GATEWAY,
    REQUEST_ID,
    REQUEST_ID_HEADER,
    VARIANT_HEADER,
    Guard,
    Handler,
)
from rollguard.serving.codec import (
    BINARY_HEADER,
    decode_infer_request,
    encode_infer_response,
    encode_passthrough_response,
    select_outputs,
)
from rollguard.serving.errors import InvalidInput, NotReady
from rollguard.serving.manifest import Manifest
from rollguard.serving.predictcodec import decode_predict_request, encode_predictions

SERVER_NAME = "rollguard"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_repository", "rollouts", "feedback"]
_PLATFORM = {
    "onnx": "onnxruntime_onnx",
    "torch": "pytorch",
    "sklearn": "sklearn",
    "http": "remote_v2",
}


def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        content_type="application/json",
    )


_BINARY_KEY = BINARY_HEADER.lower()
_NO_COOKIES: Mapping[str, str] = MappingProxyType({})


@lru_cache(maxsize=256)
def _caseless(source: KeySource) -> KeySource:
    """The source with a lower-case header name, for lower-case header mappings."""
    return KeySource(source.kind, source.name.lower()) if source.kind == "header" else source


def stickiness_key(gateway: Inference, model: str, headers: Mapping[str, str]) -> str | None:
    """The request's stickiness key for `model`'s split; `headers` keyed by lower-case names
    (or case-insensitive, as aiohttp's are)."""
    table = gateway.router.table(model)
    source = table.key_source if table is not None else None
    if source is None:
        return None
    if source.kind == "cookie":
        # Parsed only for cookie keys; a header the standard parser refuses has no key.
        jar = SimpleCookie()
        try:
            jar.load(headers.get("cookie", ""))
        except CookieError:
            return None
        return source.extract(headers, {name: morsel.value for name, morsel in jar.items()})
    return _caseless(source).extract(headers, _NO_COOKIES)


def _answered(answer: Answer, body: bytes, header_len: int | None) -> Reply:
    headers = [(VARIANT_HEADER, answer.version), (REQUEST_ID_HEADER, answer.request_id)]
    if header_len is None:
        return Reply(200, body, JSON, headers)
    headers.append((BINARY_HEADER, str(header_len)))
    return Reply(200, body, "application/octet-stream", headers)


async def infer_core(
    gateway: Inference,
    model: str,
    pinned: str | None,
    body: bytes,
    headers: Mapping[str, str],
    request_id: str | None,
) -> Reply:
    """One V2 infer request, whatever transport carried it; errors come back as replies.

    `headers` is keyed by lower-case names (or case-insensitive); `request_id` is the
    x-request-id header's. The answer's id is the body's id, else that, else a new one.
    """
    try:
        binary_header = headers.get(_BINARY_KEY)
        parsed = decode_infer_request(body, binary_header)
        header_id = request_id
        request_id = parsed.id or header_id or gateway.new_request_id()
        if "\n" in request_id or "\r" in request_id:  # it is echoed as a header
            request_id = header_id  # a header value cannot hold CR or LF
            raise InvalidInput(f"the request id {parsed.id!r} must not contain CR or LF")
        # Plain JSON asking for every output can go to a remote upstream byte for byte.
        plain = binary_header is None and parsed.outputs is None and not parsed.binary_outputs
        answer = await gateway.infer(
            model,
            parsed.inputs,
            request_id=request_id,
            key=None if pinned else stickiness_key(gateway, model, headers),
            version=pinned,
            requested=parsed.outputs,
            body=body if plain else None,
        )
        if answer.passthrough is not None:
            passed = encode_passthrough_response(
                answer.passthrough,
                model_name=model,
                model_version=answer.version,
                request_id=parsed.id,
                declared=answer.manifest.output_specs,
            )
            return _answered(answer, passed, None)
        outputs = select_outputs(answer.outputs, parsed.outputs, answer.manifest.output_specs)
        encoded, header_len = encode_infer_response(
            outputs,
            model_name=model,
            model_version=answer.version,
            request_id=parsed.id,
            binary_outputs=parsed.binary_outputs,
        )
        return _answered(answer, encoded, header_len)
    except Exception as exc:
        path = (
            f"/v2/models/{model}/versions/{pinned}/infer" if pinned else f"/v2/models/{model}/infer"
        )
        return reply_for(exc, request_id or gateway.new_request_id(), f"POST {path}")


async def infer(request: web.Request) -> web.Response:
    """POST /v2/models/{model}/infer and /v2/models/{model}/versions/{version}/infer."""
    reply = await infer_core(
        request.app[GATEWAY],
        request.match_info["model"],
        request.match_info.get("version"),
        await request.read(),
        request.headers,
        request[REQUEST_ID],
    )
    return reply.to_response()


async def predict(request: web.Request) -> web.Response:
    """POST /predict/{model}: {"features": ...} or {"instances": [...]} for non-V2 callers."""
    gateway = request.app[GATEWAY]
    model = request.match_info["model"]
    specs = gateway.registry.get(model, gateway.primary_version(model)).manifest.input_specs
    tensors, body_id, single = decode_predict_request(await request.read(), specs)
    request_id = body_id or request[REQUEST_ID] or gateway.new_request_id()
    request[REQUEST_ID] = request_id
    answer = await gateway.infer(
        model,
        tensors,
        request_id=request_id,
        key=stickiness_key(gateway, model, request.headers),
    )
    doc = {
        "model": model,
        "version": answer.version,
        "id": answer.request_id,
        "predictions": encode_predictions(answer.outputs, single),
    }
    body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return _answered(answer, body, None).to_response()


async def feedback(request: web.Request) -> web.Response:
    """POST /v2/models/{model}/feedback: delayed ground truth, one object or a list."""
    gateway = request.app[GATEWAY]
    model = request.match_info["model"]
    gateway.registry.versions(model)  # 404 for an unknown model
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"feedback body is not valid JSON: {exc}") from None
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise InvalidInput("feedback list is empty")
    labels: list[tuple[str, float]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise InvalidInput(f"feedback[{i}]: needs a string 'id'")
        label = item.get("label")
        if isinstance(label, list) and len(label) == 1:
            label = label[0]
        if isinstance(label, bool) or not isinstance(label, int | float):
            raise InvalidInput(f"feedback[{i}]: 'label' must be a number")
        labels.append((item["id"], float(label)))
    accepted, unknown = [], []
    for request_id, label in labels:
        result = gateway.feedback(request_id, label)
        if result is None:
            unknown.append(request_id)
            continue
        version, correct = result
        gateway.metrics.feedback.labels(model, version, "correct" if correct else "wrong").inc()
        accepted.append({"id": request_id, "version": version, "correct": correct})
    if not accepted and not isinstance(doc, list):
        raise FeedbackUnknown(f"request id {labels[0][0]!r} is unknown or already labelled")
    return json_response({"accepted": accepted, "unknown": unknown})


def _version_metadata(manifest: Manifest, versions: list[str]) -> dict[str, Any]:
    return {
        "name": manifest.name,
        "versions": versions,
        "platform": _PLATFORM[manifest.framework],
        "inputs": [t.spec().to_json() for t in manifest.inputs],
        "outputs": [t.spec().to_json() for t in manifest.outputs],
        "parameters": {"version": manifest.version, "stage": manifest.stage},
    }


async def model_metadata(request: web.Request) -> web.Response:
    """GET /v2/models/{model}[/versions/{version}]."""
    gateway = request.app[GATEWAY]
    model = request.match_info["model"]
    versions = gateway.registry.versions(model)
    version = request.match_info.get("version")
    if version is None:
        version = gateway.primary_version(model)
    manifest = gateway.registry.get(model, version).manifest
    return json_response(_version_metadata(manifest, versions))


async def model_ready(request: web.Request) -> web.Response:
    """GET /v2/models/{model}[/versions/{version}]/ready: 200 when it can serve."""
    gateway = request.app[GATEWAY]
    model = request.match_info["model"]
    version = request.match_info.get("version")
    if version is None:
        version = gateway.primary_version(model)
    loaded = gateway.registry.get(model, version)
    if not loaded.runner.ready:
        raise NotReady(f"{model}/{version} is not ready")
    return web.Response(status=200)


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})


async def live(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def ready(request: web.Request) -> web.Response:
    if not request.app[GATEWAY].registry.models():
        raise NotReady("no model is loaded yet")
    return web.Response(status=200)


def add_routes(app: web.Application, guard: Guard) -> None:
    """The data-plane routes, each wrapped by `guard`; infer first, as it is matched most."""
    routes: list[tuple[str, str, Handler]] = [
        ("POST", "/v2/models/{model}/infer", infer),
        ("POST", "/v2/models/{model}/versions/{version}/infer", infer),
        ("POST", "/predict/{model}", predict),
        ("POST", "/v2/models/{model}/feedback", feedback),
        ("GET", "/v2", server_metadata),
        ("GET", "/v2/health/live", live),
        ("GET", "/v2/health/ready", ready),
        ("GET", "/v2/models/{model}", model_metadata),
        ("GET", "/v2/models/{model}/ready", model_ready),
        ("GET", "/v2/models/{model}/versions/{version}", model_metadata),
        ("GET", "/v2/models/{model}/versions/{version}/ready", model_ready),
    ]
    for method, path, handler in routes:
        if method == "GET":
            app.router.add_get(path, guard(handler))
        else:
            app.router.add_route(method, path, guard(handler))
