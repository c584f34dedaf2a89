"""Remote runner: forwards V2 infer requests to an upstream server's model URL."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson

from serving.codec import decode_infer_response, encode_infer_request
from serving.errors import ArtifactError, NotReady, UpstreamError, UpstreamTimeout
from serving.manifest import Manifest
from serving.runners.base import Runner
from serving.tensors import Tensors

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
    """A version served by another V2 server (Triton, MLServer, KServe, another rollguard)."""

    passes_v2_bodies = True

    def __init__(
        self,
        manifest: Manifest,
        directory: Path,
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        super().__init__(manifest, directory)
        assert manifest.endpoint is not None  # the manifest validator requires it for http
        self.endpoint = manifest.endpoint.rstrip("/")
        self._session = session
        self._owns_session = False
        self._infer_url = f"{self.endpoint}/infer"
        self._timeout = aiohttp.ClientTimeout(total=manifest.timeout_s)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise NotReady(f"{self.manifest.name} {self.manifest.version} is not loaded")
        return self._session

    async def load(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        try:
            await self._probe_ready()
        except ArtifactError:
            await self._close_owned()
            raise
        self.ready = True

    async def _probe_ready(self) -> None:
        url = f"{self.endpoint}/ready"
        try:
            async with self._client().get(url, timeout=self._timeout) as response:
                status = response.status
                body = await response.read()
        except TimeoutError:
            raise ArtifactError(f"{url}: no answer within {self.manifest.timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise ArtifactError(f"{url}: unreachable: {exc}") from None
        if status != 200:
            raise ArtifactError(f"{url}: upstream not ready ({status}: {_error_text(body)})")

    async def predict(self, inputs: Tensors) -> Tensors:
        outputs, _ = decode_infer_response(await self.predict_raw(encode_infer_request(inputs)))
        return outputs

    async def predict_raw(self, body: bytes) -> bytes:
        """POST a V2 JSON infer body as given; the upstream's 2xx body as it came.

        The gateway forwards a client's body through this when it needs no re-encoding,
        which spares a JSON -> numpy -> JSON round trip each way.
        """
        try:
            async with self._client().post(
                self._infer_url, data=body, headers=_JSON, timeout=self._timeout
            ) as response:
                status = response.status
                payload = await response.read()
        except TimeoutError:
            raise UpstreamTimeout(
                f"{self._infer_url}: no answer within {self.manifest.timeout_s:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{self._infer_url}: {type(exc).__name__}: {exc}") from None
        if not 200 <= status < 300:
            raise UpstreamError(f"{self._infer_url} answered {status}: {_error_text(payload)}")
        return payload

    async def unload(self) -> None:
        self.ready = False
        await self._close_owned()

    async def _close_owned(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None
            self._owns_session = False
