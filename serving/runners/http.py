"""Remote runner: forwards V2 infer requests to an upstream server's model URL."""

from __future__ import annotations

from pathlib import Path

import orjson

from rollguard.serving.errors import ArtifactError, ManifestError, NotReady, UpstreamError
from rollguard.serving.manifest import Manifest
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.runners.base import Runner
from rollguard.serving.upstream import UpstreamPool

_JSON = {"Content-Type": "application/json"}


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


class HttpRunner(Runner):
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

    def _open(self) -> None:
        try:
            pool = UpstreamPool(self.endpoint, timeout_s=self.manifest.timeout_s)
        except ValueError as exc:
            raise ManifestError(f"endpoint: {exc}") from None
        self._infer = pool.prepare("POST", "/infer", _JSON)  # encoded once per pool
        self._pool = pool

    def _client(self) -> UpstreamPool:
        if self._pool is None:
            raise NotReady(f"{self.manifest.name} {self.manifest.version} is not loaded")
        return self._pool

    async def load(self) -> None:
        if self._pool is None:
            self._open()
        try:
            await self._probe_ready()
        except BaseException:  # refused or cancelled: the caller may drop us without unload
            await self.unload()
            raise
        self._ready = True

    async def _probe_ready(self) -> None:
        url = f"{self.endpoint}/ready"
        try:
            status, body = await self._client().request("GET", "/ready")
        except UpstreamError as exc:  # names the URL and the reason, e.g. "unreachable: ..."
            raise ArtifactError(str(exc)) from None
        if status != 200:
            raise ArtifactError(f"{url}: upstream not ready ({status}: {_error_text(body)})")

    async def predict(self, request: InferRequest) -> InferResponse:
        """POST the request's V2 JSON body (the client's own bytes when they need no
        re-encoding); the upstream's 2xx answer, unconverted until someone reads it. The
        pool's UpstreamError / UpstreamTimeout name the URL and the reason."""
        status, payload = await self._client().send(self._infer, request.upstream_body())
        if not 200 <= status < 300:
            raise UpstreamError(f"{self._infer_url} answered {status}: {_error_text(payload)}")
        return InferResponse.of_upstream(payload)

    async def unload(self) -> None:
        self._ready = False
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
