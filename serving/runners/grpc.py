"""Remote runner for `framework: grpc`: V2 gRPC upstreams (Triton, KServe, MLServer,
another rollguard's gRPC port).

    framework: grpc
    endpoint: grpc://10.0.0.5:8001          # or 10.0.0.5:8001
    upstream: {model: fraud, version: "2"}  # the upstream's names (default: ours, its pick)

One channel per version (HTTP/2: every call multiplexed on it), made at construction,
closed by `unload`, made afresh by the next `load`; each call has the manifest's
`timeout_s` as its deadline. Health is followed as for `framework: http`
(runners/remote.py): `ModelReady` probes, and outlier ejection after failed calls.

A request goes as it came when a gRPC client sent it (only the model name and version
changed to the upstream's); a REST request goes as the `ModelInferRequest` that says
the same (serving/v2grpc/codec.py). The client headers the gateway lets through and the
manifest's `upstream.headers_from_env` go as metadata.

Status codes, as the HTTP runner reads statuses: INVALID_ARGUMENT, OUT_OF_RANGE,
FAILED_PRECONDITION (400), UNAUTHENTICATED (401), PERMISSION_DENIED (403), ABORTED (409)
and RESOURCE_EXHAUSTED (413: what gRPC servers answer to a message over their limit)
blame the client's request: `UpstreamRejected`, passed back and counted against no one.
DEADLINE_EXCEEDED is `UpstreamTimeout` (504); any other code, or an answer that does
not hold, is `UpstreamError` (502): the version's failures.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import orjson

from rollguard.serving.errors import (
    ArtifactError,
    InvalidInput,
    ManifestError,
    NotReady,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
from rollguard.serving.manifest import Manifest, grpc_target
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.runners.remote import RemoteRunner
from rollguard.serving.upstream import DEFAULT_MAX_RESPONSE_BYTES
from rollguard.serving.v2grpc import method, pb
from rollguard.serving.v2grpc.codec import encode_request, response_of_message

Code = grpc.StatusCode
CLIENT_FAULTS = {
    Code.INVALID_ARGUMENT: 400,
    Code.OUT_OF_RANGE: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
    Code.ABORTED: 409,
    Code.RESOURCE_EXHAUSTED: 413,
}
Metadata = tuple[tuple[str, str], ...]


class GrpcRunner(RemoteRunner):
    """A version served by another server's V2 gRPC API."""

    def __init__(self, manifest: Manifest, directory: Path) -> None:
        super().__init__(manifest, directory)
        assert manifest.endpoint is not None  # the manifest validator requires it for grpc
        try:
            self.target = grpc_target(manifest.endpoint)
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
        options = self._options
        self._model = options.model or manifest.name
        self._version = options.version or ""
        self._timeout_s = manifest.timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._metadata: Metadata = ()
        self._open()

    def _is_open(self) -> bool:
        return self._channel is not None

    def _open(self) -> None:
        own = []
        for header, variable in self._options.headers_from_env.items():
            value = os.environ.get(variable)
            if value is None:
                raise ManifestError(
                    f"upstream.headers_from_env: {header} needs environment variable "
                    f"{variable}, which is not set"
                )
            own.append((header.lower(), value))  # gRPC metadata keys are lower-case
        self._metadata = tuple(own)
        channel = grpc.aio.insecure_channel(
            self.target,
            options=[
                ("grpc.max_receive_message_length", DEFAULT_MAX_RESPONSE_BYTES),
                ("grpc.max_send_message_length", -1),
            ],
        )
        self._infer = method(channel, "ModelInfer", pb.ModelInferResponse)
        self._ready_rpc = method(channel, "ModelReady", pb.ModelReadyResponse)
        self._channel = channel

    async def _close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def _probe_ready(self) -> None:
        if self._channel is None:
            raise ArtifactError(f"{self._what} is not loaded")
        asked = pb.ModelReadyRequest(name=self._model, version=self._version)
        try:
            answer = await self._ready_rpc(
                asked.SerializeToString(), timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise ArtifactError(
                f"grpc://{self.target}: model {self._model!r} readiness: "
                f"{exc.code().name}: {exc.details()}"
            ) from None
        if not answer.ready:
            raise ArtifactError(f"grpc://{self.target}: model {self._model!r} is not ready")

    async def predict(self, request: InferRequest) -> InferResponse:
        """Call ModelInfer with the request (see the module's docstring)."""
        if self._channel is None:
            raise NotReady(f"{self._what} is not loaded")
        body = encode_request(request, self._model, self._version)
        metadata = self._metadata
        if request.forward:
            for name, value in request.forward:
                if not (value.isascii() and value.isprintable()):
                    raise InvalidInput(f"header {name!r} cannot go as gRPC metadata")
            metadata += tuple(request.forward)
        try:
            reply = await self._infer(body, timeout=self._timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._failure(exc) from None
        try:
            response = response_of_message(reply)
        except UpstreamError as failure:
            self._failed(failure)
            raise
        self._answered()
        return response

    def _failure(self, exc: grpc.aio.AioRpcError) -> Exception:
        """The error an upstream's status stands for, its outcome recorded."""
        code = exc.code()
        details = exc.details() or code.name
        message = f"grpc://{self.target} answered {code.name}: {details}"
        status = CLIENT_FAULTS.get(code)
        if status is not None:
            self._answered()
            body = orjson.dumps({"error": details})
            return UpstreamRejected(message, status, body, "application/json")
        failure = (
            UpstreamTimeout(f"grpc://{self.target}: no answer within {self._timeout_s:g} s")
            if code == Code.DEADLINE_EXCEEDED
            else UpstreamError(message)
        )
        self._failed(failure)
        return failure
