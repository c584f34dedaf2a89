"""The data port's endpoints: Open Inference Protocol (V2) REST, `/predict` and feedback.

`DataPlane.handle` answers every request the data port reads, errors included: it
admits it, matches its route, calls the handler and gives every answer its request id.
A model's routes first pass its gate: the caller's credential (proxy/auth.py) and its
rate limit (proxy/limits.py); health and server metadata are open to all.
Handlers only do HTTP: decode with the codec, call the inference service, encode.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import orjson

from rollguard import __version__
from rollguard.proxy.auth import Authenticator, Principal, Scope
from rollguard.proxy.errors import (
    RETRY_AFTER_S,
    FeedbackExpired,
    FeedbackUnknown,
    Forbidden,
    MethodNotAllowed,
    ProxyError,
    RateLimited,
    TooBusy,
    Unauthorized,
    public_message,
    status_for,
    unforeseen,
)
from rollguard.proxy.inference import Answer, Inference
from rollguard.proxy.limits import RateLimiter
from rollguard.proxy.routing import stickiness_key
from rollguard.proxy.urls import Params, Route, Urls
from rollguard.proxy.wire import JSON, Request, Response
from rollguard.serving.availability import Availability
from rollguard.serving.codec import (
    BINARY_HEADER,
    encode_infer_response,
    encode_items_response,
    parse_json,
    relay_response,
    select_items,
    select_outputs,
)
from rollguard.serving.errors import InvalidInput, NotReady, ServingError, UpstreamRejected
from rollguard.serving.manifest import Manifest
from rollguard.serving.messages import InferRequest
from rollguard.serving.predictcodec import decode_predict_request, encode_predictions
from rollguard.serving.prediction import Predicted

log = logging.getLogger("rollguard")
_ns = time.perf_counter_ns

SERVER_NAME = "rollguard"
# Only extensions with routes here: the rollouts API is on the admin port.
EXTENSIONS = ["binary_tensor_data", "statistics", "feedback"]
REQUEST_ID = "x-request-id"
VARIANT = "x-rollguard-variant"
_BINARY_KEY = BINARY_HEADER.lower()
_PLATFORM = {
    "onnx": "onnxruntime_onnx",
    "torch": "pytorch",
    "sklearn": "sklearn",
    "http": "remote_v2",
    "grpc": "remote_v2_grpc",
}


def json_response(doc: Any, status: int = 200) -> Response:
    return Response(status, orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))


class _Throttle:
    """At most one log line a second per error type: failures can come by the thousand."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[type, float] = {}

    def due(self, kind: type) -> bool:
        now = self._clock()
        if now - self._last.get(kind, float("-inf")) < 1.0:
            return False
        self._last[kind] = now
        return True


_DETAILS = _Throttle()  # what error bodies leave out goes to the log


def error_response(exc: BaseException, request_id: str | None, what: str) -> Response:
    """An exception as its V2 error answer: `{"error": ...}` with what a client may read
    (`public_message`), its status from the one table, the failing variant, Retry-After
    on 503 and 429, the challenge on 401. Bugs of ours are logged with `what`, and so is
    any detail the answer leaves out (paths, URLs, digests)."""
    message = public_message(exc)
    if unforeseen(exc):
        log.error("%s failed", what, exc_info=exc)
    elif message != str(exc) and _DETAILS.due(type(exc)):
        log.warning("%s (request %s): %s", what, request_id, exc)
    status = status_for(exc)
    headers: list[tuple[str, str]] = []
    if request_id:
        headers.append((REQUEST_ID, request_id))
    version = exc.version if isinstance(exc, ServingError) else None
    if version:
        headers.append((VARIANT, version))
    if status == 503:
        headers.append(("Retry-After", RETRY_AFTER_S))
    elif isinstance(exc, RateLimited):
        headers.append(("Retry-After", str(exc.retry_after)))
    elif isinstance(exc, Unauthorized | Forbidden) and exc.challenge:
        headers.append(("WWW-Authenticate", exc.challenge))
    elif isinstance(exc, MethodNotAllowed):
        headers.append(("Allow", ", ".join(exc.allowed)))
    elif isinstance(exc, UpstreamRejected):  # the upstream's own answer, as it came
        return Response(status, exc.body, exc.content_type, headers)
    return Response(status, orjson.dumps({"error": message}), JSON, headers)


MAX_REQUEST_ID = 256  # characters; a UUID is 36, a W3C trace id 32


def echoable(value: str) -> bool:
    """Whether a client's request id may be echoed (`checked_request_id` would pass it)."""
    return value.isprintable() and len(value) <= MAX_REQUEST_ID


def checked_request_id(value: str) -> str:
    """A request id as it may be echoed in a header and kept until its label comes:
    printable, no control characters, at most MAX_REQUEST_ID characters. A longer one
    was kept whole by the feedback index (a megabyte each, 100,000 of them) and echoed in
    a header clients and upstreams refuse to read."""
    if not value.isprintable():
        raise InvalidInput("the request id must not contain control characters")
    if len(value) > MAX_REQUEST_ID:
        raise InvalidInput(
            f"the request id has {len(value)} characters; at most {MAX_REQUEST_ID} are taken"
        )
    return value


class Guarded(Protocol):
    """A model route's handler: given the caller its credential proves (None: none)."""

    def __call__(
        self, request: Request, params: Params, caller: Principal | None
    ) -> Awaitable[Response]: ...


class DataPlane:
    """Every route of the data port, the gate of a model's routes (credential, rate
    limit), and the admission every POST goes through."""

    def __init__(
        self,
        inference: Inference,
        *,
        max_inflight: int,
        auth: Authenticator | None = None,
        limiter: RateLimiter | None = None,
        forward_headers: tuple[str, ...] = (),
        strict_readiness: bool = False,
        readiness_details: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """`forward_headers`: the lower-case names of client headers an http upstream
        gets with the request (x-request-id: the request's id, given or made here).
        `strict_readiness`: the gateway is ready only while every model's primary
        version can serve (Triton's strict readiness); else while any can.
        `readiness_details`: fields added to a ready answer (fleet mode: Redis's state)."""
        self.inference = inference
        self.strict_readiness = strict_readiness
        self._details = readiness_details
        self._forward = tuple(n for n in forward_headers if n != REQUEST_ID)
        self._forward_id = REQUEST_ID in forward_headers
        self.max_inflight = max_inflight
        self.inflight = 0
        self.draining = False  # readiness says no while a shutdown drains connections
        self.auth = auth if auth is not None and auth.active else None
        self.limiter = limiter if limiter is not None and limiter.config.enabled else None
        self._rejected = inference.metrics.rejected
        gate = self._gated
        self._urls = Urls(
            [
                Route("POST", "/v2/models/{model}/infer", gate("infer", self.infer)),
                Route(
                    "POST",
                    "/v2/models/{model}/versions/{version}/infer",
                    gate("infer", self.infer),
                ),
                Route("POST", "/predict/{model}", gate("infer", self.predict)),
                Route("POST", "/v2/models/{model}/feedback", gate("feedback", self.feedback)),
                Route("GET", "/v2", self.server_metadata),
                Route("GET", "/v2/health/live", self.live),
                Route("GET", "/v2/health/ready", self.ready),
                Route("GET", "/v2/models/stats", self.all_stats),  # before {model}, as Triton
                Route("GET", "/v2/models/{model}", gate(None, self.model_metadata)),
                Route("GET", "/v2/models/{model}/stats", gate(None, self.model_stats)),
                Route(
                    "GET",
                    "/v2/models/{model}/versions/{version}/stats",
                    gate(None, self.model_stats),
                ),
                Route("GET", "/v2/models/{model}/ready", gate(None, self.model_ready)),
                Route(
                    "GET",
                    "/v2/models/{model}/versions/{version}",
                    gate(None, self.model_metadata),
                ),
                Route(
                    "GET",
                    "/v2/models/{model}/versions/{version}/ready",
                    gate(None, self.model_ready),
                ),
            ]
        )

    def _gated(
        self, scope: Scope | None, handler: Guarded
    ) -> Callable[[Request, Params], Awaitable[Response]]:
        """`handler` behind the model's gate: the caller it is given is the principal the
        request's credential proves (None when it brings none, or auth is off)."""
        if self.auth is None and self.limiter is None:
            # No gate: the handler itself, without a coroutine in between (a frame per
            # request on the hot path).
            return functools.partial(handler, caller=None)

        async def guarded(request: Request, params: Params) -> Response:
            admitted = self.admit(request.headers, request.peer, params["model"], scope)
            return await handler(request, params, admitted)

        return guarded

    def admit(
        self, headers: Mapping[str, str], peer: str, model: str, scope: Scope | None
    ) -> Principal | None:
        """Who calls, if anyone can tell, checked against the model's needs and the
        caller's rate limit; Unauthorized, Forbidden or RateLimited otherwise. `headers`
        by lower-case name (a gRPC call's metadata alike), `peer` the client's address."""
        principal = None
        try:
            if self.auth is not None:
                principal = self.auth.check(headers, scope, model)
            limiter = self.limiter
            if limiter is not None:
                if principal is not None:
                    limiter.check(principal.name, principal.tier)
                else:
                    given = headers.get(limiter.header) if limiter.header else None
                    client = f"header:{given}" if given else f"address:{peer}"
                    limiter.check(client, None)
        except (Unauthorized, Forbidden, RateLimited) as exc:
            reason = {Unauthorized: "unauthenticated", Forbidden: "forbidden"}.get(
                type(exc), "rate_limited"
            )
            self._rejected.labels(self._known(model), reason).inc()
            raise
        return principal

    def _known(self, model: str) -> str:
        """`model` as a metric label when the registry knows it, else "": label values
        never come from whatever a client writes in a URL."""
        try:
            self.inference.registry.versions(model)
        except ServingError:
            return ""
        return model

    async def handle(self, request: Request) -> Response:
        """The answer to any request; never raises."""
        header_id = request.headers.get(REQUEST_ID)
        admitted = False
        try:
            if header_id is not None:
                checked_request_id(header_id)
            handler, params = self._urls.match(request.method, request.path)
            if request.method == "POST" and self.inflight >= self.max_inflight:
                self._rejected.labels(self._known(params.get("model", "")), "overloaded").inc()
                raise TooBusy(
                    f"{self.inflight} requests in flight, the limit is {self.max_inflight}"
                )
            self.inflight += 1
            admitted = True
            response = await handler(request, params)
        except Exception as exc:
            valid_id = header_id if header_id is not None and echoable(header_id) else None
            return error_response(exc, valid_id or self.inference.new_request_id(),
                                  f"{request.method} {request.path}")  # fmt: skip
        finally:
            if admitted:
                self.inflight -= 1
        headers = response.headers
        if headers is None:
            response.headers = [(REQUEST_ID, header_id or self.inference.new_request_id())]
        elif headers[0][0] != REQUEST_ID:  # the inference handlers put theirs first
            headers.append((REQUEST_ID, header_id or self.inference.new_request_id()))
        return response

    def refuse(self, error: ProxyError, headers: Mapping[str, str]) -> Response:
        """The answer to a request that could not be read (malformed, too large), with the
        client's request id when its headers got that far."""
        given = headers.get(REQUEST_ID)
        request_id = given if given is not None and echoable(given) else None
        return error_response(
            error, request_id or self.inference.new_request_id(), "reading a request"
        )

    # --- inference -----------------------------------------------------------------------

    async def infer(self, request: Request, params: Params, caller: Principal | None) -> Response:
        """POST /v2/models/{model}/infer and /v2/models/{model}/versions/{version}/infer."""
        headers = request.headers
        model, pinned = params["model"], params.get("version")
        request_id = headers.get(REQUEST_ID)
        start = _ns()
        try:
            parsed = InferRequest.decode(request.body, headers.get(_BINARY_KEY))
            request_id = self.request_id_of(parsed, request_id)
            decoded = _ns()
            answer = await self.infer_decoded(
                model, parsed, headers, request_id=request_id, pinned=pinned, caller=caller
            )
            answered = _ns()
            response = _encoded(answer, parsed, model)
            self.inference.stats.succeeded(
                model, answer.version, parsed.rows(), decoded - start, answered - decoded,
                _ns() - answered, parsed.queue_ns,
            )  # fmt: skip
            return response
        except Exception as exc:
            self.count_failure(model, exc, start)
            return error_response(exc, request_id or self.inference.new_request_id(),
                                  f"POST {request.path}")  # fmt: skip

    def request_id_of(self, parsed: InferRequest, given: str | None) -> str:
        """A request's id: its body's, else the one its caller gave, else a new one."""
        if parsed.id is not None:
            return checked_request_id(parsed.id)
        return given or self.inference.new_request_id()

    def infer_decoded(
        self,
        model: str,
        parsed: InferRequest,
        headers: Mapping[str, str],
        *,
        request_id: str,
        pinned: str | None,
        caller: Principal | None,
    ) -> Awaitable[Answer]:
        """What REST and gRPC (proxy/grpc_endpoints.py) share for a decoded infer request:
        the split's stickiness key and the client headers an upstream gets, both from
        `headers` (lower-case names; a gRPC call's metadata), then the inference service's
        call to await (returned, not awaited here: a coroutine layer less per request)."""
        key = None if pinned else stickiness_key(self.inference.router, model, headers)
        if self._forward or self._forward_id:
            forward = [(n, headers[n]) for n in self._forward if n in headers]
            if self._forward_id:
                forward.append((REQUEST_ID, request_id))
            parsed.forward = forward
        return self.inference.infer(
            model,
            parsed,
            request_id=request_id,
            key=key,
            version=pinned,
            client=caller.name if caller is not None else None,
        )

    def count_failure(self, model: str, exc: Exception, start: int) -> None:
        """A version's own failure in its statistics; bad input is no one's."""
        version = exc.version if isinstance(exc, ServingError) else None
        if version is not None and not isinstance(exc, InvalidInput | UpstreamRejected):
            self.inference.stats.failed(model, version, _ns() - start)

    async def predict(self, request: Request, params: Params, caller: Principal | None) -> Response:
        """POST /predict/{model}: {"features": ...} or {"instances": [...]} for non-V2 callers."""
        inference = self.inference
        model = params["model"]
        start = _ns()
        manifest = inference.registry.get(model, inference.primary_version(model)).manifest
        schemas = {t.name: t.features for t in manifest.inputs if t.features}
        arrays, body_id, single = decode_predict_request(
            request.body, manifest.input_specs, schemas
        )
        request_id = checked_request_id(body_id) if body_id else request.headers.get(REQUEST_ID)
        request_id = request_id or inference.new_request_id()
        parsed = InferRequest.of_arrays(arrays, id=body_id)
        decoded = _ns()
        try:
            answer = await inference.infer(
                model,
                parsed,
                request_id=request_id,
                key=stickiness_key(inference.router, model, request.headers),
                client=caller.name if caller is not None else None,
            )
        except Exception as exc:
            self.count_failure(model, exc, start)
            raise
        answered = _ns()
        doc = {
            "model": model,
            "version": answer.version,
            "id": answer.request_id,
            "predictions": encode_predictions(answer.response.arrays(), single),
        }
        body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        inference.stats.succeeded(
            model, answer.version, parsed.rows(), decoded - start, answered - decoded,
            _ns() - answered, parsed.queue_ns,
        )  # fmt: skip
        return Response(200, body, JSON, [(REQUEST_ID, request_id), (VARIANT, answer.version)])

    async def feedback(
        self, request: Request, params: Params, caller: Principal | None
    ) -> Response:
        """POST /v2/models/{model}/feedback: delayed ground truth, one object or a list.

        Each object is `{"id": ..., "label": ...}`; `label` is a number or a class name for
        a one-row request, a list of them (one per row, in order) for a batch. A label
        reaches a request of this model made by the same caller (proxy/feedback.py); the
        answer lists the ids accepted, unknown and expired, and never which version served
        a request or whether its answer was right: a labeller learns nothing it could
        steer a rollout with. A single object for an id that cannot take a label is a
        404 (unknown) or 410 (expired)."""
        inference = self.inference
        model = params["model"]
        inference.registry.versions(model)  # 404 for an unknown model
        doc = parse_json(request.body)
        items = doc if isinstance(doc, list) else [doc]
        if not items:
            raise InvalidInput("feedback list is empty")
        labels: list[tuple[str, tuple[Predicted, ...]]] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                raise InvalidInput(f"feedback[{i}]: needs a string 'id'")
            labels.append((item["id"], _labels(item.get("label"), i)))
        client = caller.name if caller is not None else None
        result = inference.feedback(model, labels, client=client)
        if not isinstance(doc, list) and not result.accepted:
            request_id = labels[0][0]
            if result.expired:
                raise FeedbackExpired(
                    f"request id {request_id!r} of model {model!r} was forgotten before its "
                    "label came: the gateway keeps requests for labels within its "
                    "feedback_capacity and feedback_max_age_s"
                )
            raise FeedbackUnknown(
                f"request id {request_id!r} names no request of model {model!r} from this "
                "caller that can take a label (unknown or already labelled)"
            )
        return json_response(
            {"accepted": result.accepted, "unknown": result.unknown, "expired": result.expired}
        )

    # --- health and metadata -------------------------------------------------------------

    async def server_metadata(self, request: Request, params: Params) -> Response:
        return json_response(
            {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}
        )

    async def live(self, request: Request, params: Params) -> Response:
        return json_response({"live": True})

    async def ready(self, request: Request, params: Params) -> Response:
        self.check_ready()
        if self._details is not None:
            return json_response({"ready": True, **self._details()})
        return json_response({"ready": True})

    def check_ready(self) -> None:
        """NotReady saying why unless the gateway is ready to serve (both transports)."""
        if self.draining:
            raise NotReady("shutting down")
        registry = self.inference.registry
        models = registry.models()
        if not models:
            raise NotReady("no model is loaded yet")
        # One model's upstream failing must not take the others out of service: by
        # default the gateway is ready while any model's primary version can serve.
        unready: list[str] = []
        for model in models:
            try:
                version = self.inference.primary_version(model)
            except ServingError:
                continue  # nothing loaded to serve yet: said per model, not here
            # An upstream ejected for failed calls stays in service: a client's own inputs
            # can fail five calls in a row, and the primary is called anyway.
            if (
                registry.availability(model, version) is Availability.UNREADY
                and not registry.get(model, version).runner.probed_ready
            ):
                unready.append(f"{model} {version}")
        if unready and (self.strict_readiness or len(unready) == len(models)):
            raise NotReady(f"upstream not ready: {', '.join(unready)}")

    async def model_metadata(
        self, request: Request, params: Params, caller: Principal | None
    ) -> Response:
        """GET /v2/models/{model}[/versions/{version}]."""
        inference = self.inference
        model = params["model"]
        versions = inference.registry.versions(model)
        version = params.get("version") or inference.primary_version(model)
        manifest = inference.registry.get(model, version).manifest
        return json_response(version_metadata(manifest, versions))

    async def model_stats(
        self, request: Request, params: Params, caller: Principal | None
    ) -> Response:
        """GET /v2/models/{model}[/versions/{version}]/stats: Triton's statistics extension."""
        registry = self.inference.registry
        model, version = params["model"], params.get("version")
        versions = registry.versions(model)  # 404 for an unknown model
        if version is not None:
            registry.get(model, version)  # 404 for an unknown version
            versions = [version]
        return json_response(self.inference.stats.report((model, v) for v in versions))

    async def all_stats(self, request: Request, params: Params) -> Response:
        """GET /v2/models/stats: the versions of every model the caller may see."""
        registry = self.inference.registry
        pairs: list[tuple[str, str]] = []
        for model in registry.models():
            if self.may_see(request.headers, model):
                pairs += [(model, v) for v in registry.versions(model)]
        return json_response(self.inference.stats.report(pairs))

    def may_see(self, headers: Mapping[str, str], model: str) -> bool:
        """Whether the caller's credential (if any) lets it see `model` (REST and gRPC)."""
        if self.auth is None:
            return True
        try:
            self.auth.check(headers, None, model)
        except (Unauthorized, Forbidden):
            return False
        return True

    async def model_ready(
        self, request: Request, params: Params, caller: Principal | None
    ) -> Response:
        """GET /v2/models/{model}[/versions/{version}]/ready: 200 when it can serve."""
        inference = self.inference
        model = params["model"]
        version = params.get("version") or inference.primary_version(model)
        loaded = inference.registry.get(model, version)
        if not loaded.runner.ready:
            raise NotReady(f"{model}/{version} is not ready")
        return json_response({"name": model, "ready": True})


MAX_LABEL_CHARS = 256


def _labels(given: Any, i: int) -> tuple[Predicted, ...]:
    """A feedback item's labels: one label, or a non-empty list of one per row."""
    if isinstance(given, list):
        if not given:
            raise InvalidInput(f"feedback[{i}]: 'label' is an empty list")
        return tuple(_label(label, i) for label in given)
    return (_label(given, i),)


def _label(label: Any, i: int) -> Predicted:
    """A feedback label: a number or a class name."""
    if isinstance(label, str):
        if not label or len(label) > MAX_LABEL_CHARS or not label.isprintable():
            raise InvalidInput(
                f"feedback[{i}]: a text 'label' is 1 to {MAX_LABEL_CHARS} printable characters"
            )
        return label
    if isinstance(label, bool) or not isinstance(label, int | float):
        raise InvalidInput(
            f"feedback[{i}]: 'label' must be a number or a class name (string), or a list "
            "of them, one per row"
        )
    return float(label)


def _encoded(answer: Answer, parsed: InferRequest, model: str) -> Response:
    """The V2 answer: JSON output objects as the version gave them (selected and ordered),
    or with binary tensors when the client asked for any."""
    declared = answer.manifest.output_specs
    headers = [(REQUEST_ID, answer.request_id), (VARIANT, answer.version)]
    response = answer.response
    if response.upstream is not None:  # an upstream's answer, relayed as it came
        body, header_len = relay_response(
            response.items(),
            response.upstream,
            response.binary,
            requested=parsed.outputs,
            binary_outputs=parsed.binary_outputs,
            model_name=model,
            model_version=answer.version,
            request_id=parsed.id,
        )
        if header_len is not None:
            headers.append((BINARY_HEADER, str(header_len)))
            return Response(200, body, "application/octet-stream", headers)
        return Response(200, body, JSON, headers)
    if parsed.binary_outputs:
        outputs = select_outputs(answer.response.arrays(), parsed.outputs, declared)
        body, header_len = encode_infer_response(
            outputs,
            model_name=model,
            model_version=answer.version,
            request_id=parsed.id,
            binary_outputs=parsed.binary_outputs,
        )
        if header_len is not None:
            headers.append((BINARY_HEADER, str(header_len)))
            return Response(200, body, "application/octet-stream", headers)
        return Response(200, body, JSON, headers)
    items = select_items(answer.response.items(), parsed.outputs, declared)
    body = encode_items_response(
        items, model_name=model, model_version=answer.version, request_id=parsed.id
    )
    return Response(200, body, JSON, headers)


def version_metadata(manifest: Manifest, versions: list[str]) -> dict[str, Any]:
    return {
        "name": manifest.name,
        "versions": versions,
        "platform": _PLATFORM[manifest.framework],
        "inputs": [t.spec().to_json() for t in manifest.inputs],
        "outputs": [t.spec().to_json() for t in manifest.outputs],
        "parameters": {"version": manifest.version, "stage": manifest.stage},
    }
