"""The gRPC port: the V2 gRPC API over the same data plane as the REST endpoints.

Two transports, one data plane (MLServer's pattern): an RPC is admitted as a REST
request is (the in-flight cap, then the model's gate: credential and rate limit, read
from the call's metadata as from headers), and `ModelInfer` runs through the very
`DataPlane.infer_decoded` that `POST /v2/models/{m}/infer` runs through: the same split
and stickiness key (the policy's `header:NAME` is looked up in the call's metadata),
windows, metrics, statistics, shadows and feedback ids. A `model_version` pins the call,
as the REST `/versions/{v}/infer` route does.

Failures become the REST answer first (`error_response`: the same message, logging and
status) and then the gRPC status code for that HTTP status (`CODES`). The answering
version (`x-rollguard-variant`) and the request id go in the trailing metadata, with
Retry-After on an error. Trailing rather than initial: sending initial metadata on its
own is a separate batch in grpc, which cost a third more gateway CPU per call
(load_tests/bench_grpc.py).

Messages are parsed here rather than by grpc, so that bytes that are no message are the
client's INVALID_ARGUMENT, not grpc's logged INTERNAL; a message over `max_body_bytes`
is refused by grpc itself with RESOURCE_EXHAUSTED before it is read whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from rollguard import __version__
from rollguard.proxy.endpoints import (
    EXTENSIONS,
    REQUEST_ID,
    SERVER_NAME,
    VARIANT,
    DataPlane,
    checked_request_id,
    error_response,
    version_metadata,
)
from rollguard.proxy.errors import TooBusy
from rollguard.serving.errors import InvalidInput, NotReady, ServingError
from rollguard.serving.v2grpc import METHODS, SERVICE, pb
from rollguard.serving.v2grpc.codec import decode_request, encode_response

log = logging.getLogger("rollguard")
_ns = time.perf_counter_ns
Code = grpc.StatusCode

# The HTTP status of an error (proxy/errors.py `status_for`) -> its gRPC code. 502 (an
# upstream failed or answered nonsense) is UNAVAILABLE, as in grpc's own HTTP mapping:
# the service could not answer this time and a retry may succeed; INTERNAL is kept for
# failures of the model itself (500). Other 4xx: INVALID_ARGUMENT; other 5xx: INTERNAL.
CODES = {
    400: Code.INVALID_ARGUMENT,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.NOT_FOUND,
    405: Code.UNIMPLEMENTED,
    408: Code.DEADLINE_EXCEEDED,
    409: Code.ABORTED,
    410: Code.NOT_FOUND,
    413: Code.RESOURCE_EXHAUSTED,
    415: Code.INVALID_ARGUMENT,
    422: Code.INVALID_ARGUMENT,
    429: Code.RESOURCE_EXHAUSTED,
    500: Code.INTERNAL,
    502: Code.UNAVAILABLE,
    503: Code.UNAVAILABLE,
    504: Code.DEADLINE_EXCEEDED,
}


def code_for(status: int) -> grpc.StatusCode:
    """The gRPC status code of an HTTP status."""
    found = CODES.get(status)
    if found is not None:
        return found
    return Code.INVALID_ARGUMENT if 400 <= status < 500 else Code.INTERNAL


Context = grpc.aio.ServicerContext[bytes, bytes]
Handler = Callable[[bytes, Context], Awaitable[bytes]]


class GrpcEndpoints:
    """The RPCs of `inference.GRPCInferenceService` (the V2 six and Triton's
    ModelStatistics), answered from `plane`."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.inference = plane.inference

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
        """The service's methods by name, for `add_registered_method_handlers` (matched
        in grpc's core, without a Python lookup per call)."""
        table: dict[str, Handler] = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ModelReady": self.model_ready,
            "ServerMetadata": self.server_metadata,
            "ModelMetadata": self.model_metadata,
            "ModelInfer": self.model_infer,
            "ModelStatistics": self.model_statistics,
        }
        assert tuple(table) == METHODS
        return {name: grpc.unary_unary_rpc_method_handler(h) for name, h in table.items()}

    # --- health and metadata -------------------------------------------------------------

    async def server_live(self, body: bytes, context: Context) -> bytes:
        return pb.ServerLiveResponse(live=True).SerializeToString()

    async def server_ready(self, body: bytes, context: Context) -> bytes:
        try:
            self.plane.check_ready()
        except NotReady:
            return pb.ServerReadyResponse(ready=False).SerializeToString()
        return pb.ServerReadyResponse(ready=True).SerializeToString()

    async def server_metadata(self, body: bytes, context: Context) -> bytes:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=EXTENSIONS
        ).SerializeToString()

    async def model_ready(self, body: bytes, context: Context) -> bytes:
        """Ready when the version (the model's primary one when none is named) can serve;
        NOT_FOUND for a model or version the registry does not know."""
        headers = _metadata(context)
        try:
            request = _parse(pb.ModelReadyRequest, body)
            self.plane.admit(headers, _peer(context), request.name, None)
            inference = self.inference
            try:
                version = request.version or inference.primary_version(request.name)
                ready = inference.registry.get(request.name, version).runner.ready
            except NotReady:
                ready = False
        except Exception as exc:
            await _abort(context, exc, headers.get(REQUEST_ID), "ModelReady")
        return pb.ModelReadyResponse(ready=ready).SerializeToString()

    async def model_metadata(self, body: bytes, context: Context) -> bytes:
        headers = _metadata(context)
        try:
            request = _parse(pb.ModelMetadataRequest, body)
            model = request.name
            self.plane.admit(headers, _peer(context), model, None)
            registry = self.inference.registry
            versions = registry.versions(model)
            version = request.version or self.inference.primary_version(model)
            doc = version_metadata(registry.get(model, version).manifest, versions)
        except Exception as exc:
            await _abort(context, exc, headers.get(REQUEST_ID), "ModelMetadata")
        out = pb.ModelMetadataResponse(
            name=doc["name"], versions=doc["versions"], platform=doc["platform"]
        )
        for tensor in doc["inputs"]:
            out.inputs.add(**tensor)
        for tensor in doc["outputs"]:
            out.outputs.add(**tensor)
        return out.SerializeToString()

    async def model_statistics(self, body: bytes, context: Context) -> bytes:
        """Triton's statistics extension, as `GET /v2/models[/{m}[/versions/{v}]]/stats`
        answers it: one model's versions (or one version), or, with no name, every
        version of every model the caller may see."""
        headers = _metadata(context)
        inference = self.inference
        registry = inference.registry
        try:
            request = _parse(pb.ModelStatisticsRequest, body)
            model = request.name
            pairs: list[tuple[str, str]] = []
            if model:
                self.plane.admit(headers, _peer(context), model, None)
                versions = registry.versions(model)  # NOT_FOUND for an unknown model
                if request.version:
                    registry.get(model, request.version)  # NOT_FOUND for an unknown version
                    versions = [request.version]
                pairs = [(model, v) for v in versions]
            else:
                for each in registry.models():
                    if self.plane.may_see(headers, each):
                        pairs += [(each, v) for v in registry.versions(each)]
            doc = inference.stats.report(pairs)
        except Exception as exc:
            await _abort(context, exc, headers.get(REQUEST_ID), "ModelStatistics")
        return json_format.ParseDict(doc, pb.ModelStatisticsResponse()).SerializeToString()

    # --- inference -----------------------------------------------------------------------

    async def model_infer(self, body: bytes, context: Context) -> bytes:
        """One inference, admitted, routed, counted and answered as REST's."""
        plane = self.plane
        start = _ns()
        headers = _metadata(context)
        request_id = headers.get(REQUEST_ID)
        model = ""
        admitted = False
        try:
            if request_id is not None:
                given, request_id = request_id, None  # not echoed until it passes
                request_id = checked_request_id(given)
            request = _parse(pb.ModelInferRequest, body)
            model = request.model_name
            if plane.inflight >= plane.max_inflight:
                self.inference.metrics.rejected.labels(self._known(model), "overloaded").inc()
                raise TooBusy(f"{plane.inflight} requests in flight, the limit is "
                              f"{plane.max_inflight}")  # fmt: skip
            plane.inflight += 1
            admitted = True
            caller = plane.admit(headers, _peer(context), model, "infer")
            parsed = decode_request(request)
            request_id = plane.request_id_of(parsed, request_id)
            decoded = _ns()
            answer = await plane.infer_decoded(
                model,
                parsed,
                headers,
                request_id=request_id,
                pinned=request.model_version or None,
                caller=caller,
            )
            answered = _ns()
            out = encode_response(
                answer.response,
                requested=parsed.outputs,
                declared=answer.manifest.output_specs,
                model_name=model,
                model_version=answer.version,
                request_id=parsed.id,
            ).SerializeToString()
            self.inference.stats.succeeded(
                model, answer.version, parsed.rows(), decoded - start, answered - decoded,
                _ns() - answered, parsed.queue_ns,
            )  # fmt: skip
        except Exception as exc:
            plane.count_failure(model, exc, start)
            await _abort(context, exc, request_id or self.inference.new_request_id(),
                         "ModelInfer")  # fmt: skip
        finally:
            if admitted:
                plane.inflight -= 1
        context.set_trailing_metadata(((REQUEST_ID, request_id), (VARIANT, answer.version)))
        return out

    def _known(self, model: str) -> str:
        """`model` as a metric label when the registry knows it, else ""."""
        try:
            self.inference.registry.versions(model)
        except ServingError:
            return ""
        return model


def _parse(kind: type[Any], body: bytes) -> Any:
    try:
        return kind.FromString(body)
    except DecodeError:
        raise InvalidInput(f"the request is not a {kind.__name__} message") from None


def _metadata(context: Context) -> dict[str, str]:
    """The call's text metadata by (lower-case) key, the first of repeated keys, as the
    data port reads headers; binary (`-bin`) entries are left out."""
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str) and key not in found:
            found[key] = value
    return found


def _peer(context: Context) -> str:
    """The client's address from grpc's `ipv4:1.2.3.4:5678` / `ipv6:[::1]:5678`."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return rest or peer


async def _abort(context: Context, exc: Exception, request_id: str | None, what: str) -> NoReturn:
    """End the call with `exc` as the REST port would answer it: the same message (the
    upstream's own error text for a 4xx it passed through), the code for its status,
    the headers as trailing metadata. Raises, as `ServicerContext.abort` does."""
    answer = error_response(exc, request_id, f"gRPC {what}")
    message = _error_text(answer.body)
    metadata = tuple((name.lower(), value) for name, value in answer.headers or ())
    await context.abort(code_for(answer.status), message, metadata)


def _error_text(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    return body.decode("utf-8", errors="replace").strip()[:500] or "the request failed"


class GrpcServer:
    """The gRPC listener: started on its own port, stopped with a grace period."""

    def __init__(
        self, plane: DataPlane, *, max_message_bytes: int, idle_s: float, max_streams: int
    ) -> None:
        """`max_message_bytes`: the largest message taken (the REST body limit);
        `idle_s`: a connection with no call for this long is closed (the REST
        keep-alive); `max_streams`: calls at once on one connection (the in-flight cap)."""
        self._endpoints = GrpcEndpoints(plane)
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_connection_idle_ms", int(idle_s * 1000)),
            ("grpc.max_concurrent_streams", max_streams),
        ]
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen on host:port (0: any free port); the port bound. OSError when it cannot
        be bound: grpc would otherwise share a port another process holds
        (SO_REUSEPORT), so that is off unless `reuse_port` (`serve --workers N`: the
        workers share the port on purpose)."""
        options = [*self._options, ("grpc.so_reuseport", 1 if reuse_port else 0)]
        server = grpc.aio.server(options=options)
        server.add_registered_method_handlers(SERVICE, self._endpoints.handlers())
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"gRPC port {address}: cannot listen: {exc}") from None
        if not bound:
            raise OSError(f"gRPC port {address}: cannot listen")
        await server.start()
        self._server = server
        return bound

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls, give those running `grace_s` to finish, then cancel them."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace_s)
