"""Remote runner: forwards V2 infer requests to an upstream server's model URL, losslessly.

The client's body goes as it came: its `id`, `parameters`, each input's `parameters`
and requested `outputs` intact, binary tensors (Inference-Header-Content-Length) as
binary, unless the manifest says the upstream takes none (`upstream: {binary_tensors:
false}`, MLServer 1.7.1): then the same document with those tensors as JSON. The
client headers the gateway lets through (`request.forward`) and the manifest's own
(`upstream.headers_from_env`, values from the environment) go with it.

An upstream's answer: 2xx is the version's answer (JSON or binary, relayed as it came);
a 4xx that says the client's request was wrong (`CLIENT_FAULTS`) is `UpstreamRejected`,
passed back as it came and counted against no one; any other status, a reset or an
unreadable answer is `UpstreamError` (502) and a timeout `UpstreamTimeout` (504), both
the version's failures.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from rollguard.serving.codec import BINARY_HEADER
from rollguard.serving.errors import (
    ArtifactError,
    InvalidInput,
    ManifestError,
    NotReady,
    UpstreamError,
    UpstreamRejected,
)
from rollguard.serving.manifest import Manifest
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.runners.remote import RemoteRunner
from rollguard.serving.upstream import UpstreamPool

_JSON = {"Content-Type": "application/json"}
_BINARY = {"Content-Type": "application/octet-stream"}
# An upstream's 4xx that blames the request itself: relayed, not the version's failure.
# Others (404, 405, 408, 429, ...) say the upstream is misconfigured or unwell: 502.
# 431: headers too large, which only the client's forwarded headers make (a proxy such
# as Envoy in front of the upstream answers it).
CLIENT_FAULTS = frozenset({400, 401, 403, 409, 413, 415, 422, 431})


def _error_text(body: bytes) -> str:
    """The upstream's V2 `{"error": ...}` text, else the start of its body."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    text = body.decode("utf-8", errors="replace").strip()
    return text[:200] or "(empty body)"


class HttpRunner(RemoteRunner):
    """A version served by another V2 server (Triton, MLServer, KServe, another rollguard).

    The runner owns a keep-alive connection pool to its endpoint (serving/upstream.py):
    made at construction, closed by `unload`, made afresh by the next `load`.
    """

    def __init__(self, manifest: Manifest, directory: Path) -> None:
        super().__init__(manifest, directory)
        assert manifest.endpoint is not None  # the manifest validator requires it for http
        self.endpoint = manifest.endpoint.rstrip("/")
        self._infer_url = f"{self.endpoint}/infer"
        self._pool: UpstreamPool | None = None
        self._open()

    def _is_open(self) -> bool:
        return self._pool is not None

    def _open(self) -> None:
        own = {}
        for header, variable in self._options.headers_from_env.items():
            value = os.environ.get(variable)
            if value is None:
                raise ManifestError(
                    f"upstream.headers_from_env: {header} needs environment variable "
                    f"{variable}, which is not set"
                )
            own[header] = value
        try:
            pool = UpstreamPool(self.endpoint, timeout_s=self.manifest.timeout_s)
            # Encoded once per pool: JSON bodies, and bodies with binary tensors.
            self._infer = pool.prepare("POST", "/infer", _JSON | own)
            self._infer_binary = pool.prepare("POST", "/infer", _BINARY | own)
        except ValueError as exc:
            raise ManifestError(f"endpoint or upstream headers: {exc}") from None
        self._pool = pool

    def _client(self) -> UpstreamPool:
        if self._pool is None:
            raise NotReady(f"{self.manifest.name} {self.manifest.version} is not loaded")
        return self._pool

    async def _probe_ready(self) -> None:
        url = f"{self.endpoint}/ready"
        try:
            status, body = await self._client().request("GET", "/ready")
        except UpstreamError as exc:  # names the URL and the reason, e.g. "unreachable: ..."
            raise ArtifactError(str(exc)) from None
        if status != 200:
            raise ArtifactError(f"{url}: upstream not ready ({status}: {_error_text(body)})")

    async def predict(self, request: InferRequest) -> InferResponse:
        """POST the request as it came (see the module's docstring); the upstream's 2xx
        answer, unconverted until someone reads it. The pool's UpstreamError /
        UpstreamTimeout name the URL and the reason."""
        pool = self._client()
        body, header_length = request.upstream_body(self._options.binary_tensors)
        try:
            extra = pool.header_lines(request.forward) if request.forward else b""
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        prepared = self._infer
        if header_length is not None:
            prepared = self._infer_binary
            extra += b"%s: %d\r\n" % (BINARY_HEADER.encode(), header_length)
        try:
            reply = await pool.send(prepared, body, extra)
            status = reply.status
            if 200 <= status < 300:
                response = InferResponse.of_upstream(reply.body, reply.binary_header)
                self._answered()
                return response
            message = f"{self._infer_url} answered {status}: {_error_text(reply.body)}"
            if status in CLIENT_FAULTS:
                self._answered()
                content_type = reply.content_type or "application/json"
                raise UpstreamRejected(message, status, reply.body, content_type)
            raise UpstreamError(message)
        except UpstreamError as failure:  # 5xx, reset, timeout, unreadable: the upstream's
            self._failed(failure)
            raise

    async def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
