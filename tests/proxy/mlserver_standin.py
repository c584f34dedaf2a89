"""A stand-in for MLServer 1.7.1's scikit-learn runtime, answering as it does.

Written by hand from MLServer's observed answers (not our codec), so that the gateway is
tested against the wire format a real MLServer speaks:
- `predict` is answered as shape [N, 1] (INT64 for integer classes, BYTES for names),
  each output carrying `parameters: {"content_type": "np"}`; `predict_proba` [N, 2]
  FP64 only when asked for; only `predict` when no outputs are named.
- a requested output other than those two is a 400 `{"error": ...}`; a body that is not
  JSON (binary tensor requests included) a 422 `{"detail": [...]}`; the response `id` is
  the request's, or a fresh UUID.
- `GET .../ready` answers 200 with an empty body; model metadata lists no tensors.
Every infer request is recorded (body, headers, parsed document) for the tests to read.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiohttp import web
from sklearn.base import ClassifierMixin


@dataclass
class Seen:
    """One infer request as the upstream received it."""

    version: str
    body: bytes
    headers: dict[str, str]
    doc: dict[str, Any] | None


@dataclass
class MLServerStandIn:
    """Serves `models` (version -> fitted classifier) as /v2/models/{name}/versions/{v}."""

    name: str
    models: dict[str, ClassifierMixin]
    seen: list[Seen] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)  # versions answering 500
    unready: set[str] = field(default_factory=set)  # versions whose /ready says 503
    binary: bool = False  # accept the binary tensor extension (MLServer 1.7.1 does not)

    def application(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        base = f"/v2/models/{self.name}/versions/{{version}}"
        app.router.add_post(f"{base}/infer", self.infer)
        app.router.add_get(f"{base}/ready", self.ready)
        app.router.add_get(base, self.metadata)
        return app

    def url(self, base: str, version: str) -> str:
        return f"{base}/v2/models/{self.name}/versions/{version}"

    async def ready(self, request: web.Request) -> web.Response:
        if request.match_info["version"] in self.unready:
            return web.json_response({"error": "model not ready"}, status=503)
        return web.Response(status=200)

    async def metadata(self, request: web.Request) -> web.Response:
        doc = {"name": self.name, "versions": [], "platform": "", "inputs": [], "outputs": []}
        return web.json_response({**doc, "parameters": {}})

    async def infer(self, request: web.Request) -> web.Response:
        version = request.match_info["version"]
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        binary_len = headers.get("inference-header-content-length")
        try:
            if binary_len is not None and self.binary:
                n = int(binary_len)
                doc = orjson.loads(body[:n])
                tail = body[n:]
            else:
                doc, tail = orjson.loads(body), b""
        except (orjson.JSONDecodeError, ValueError):
            self.seen.append(Seen(version, body, headers, None))
            detail = [{"type": "json_invalid", "loc": ["body", 0], "msg": "JSON decode error"}]
            return web.json_response({"detail": detail}, status=422)
        self.seen.append(Seen(version, body, headers, doc))
        if version in self.failing:
            return web.Response(status=500, text="Traceback (most recent call last): boom")
        model = self.models[version]
        x = _input(doc["inputs"][0], tail)
        wanted = [o["name"] for o in doc.get("outputs") or [{"name": "predict"}]]
        unknown = [n for n in wanted if n not in ("predict", "predict_proba")]
        if unknown:
            error = (
                "SKLearnModel only supports 'predict', 'predict_proba' and 'transform' "
                f"as outputs ({unknown[0]} was received)"
            )
            return web.json_response({"error": error}, status=400)
        outputs = [_output(n, model, x) for n in wanted]
        answer: dict[str, Any] = {
            "model_name": self.name,
            "model_version": version,
            "id": doc.get("id") or str(uuid.uuid4()),
            "parameters": {},
            "outputs": outputs,
        }
        every = (doc.get("parameters") or {}).get("binary_data_output") is True
        binary = {
            o["name"]
            for o in doc.get("outputs") or []
            if every or (o.get("parameters") or {}).get("binary_data") is True
        }
        if not self.binary or not (binary or every):
            return web.Response(body=orjson.dumps(answer), content_type="application/json")
        chunks = []  # as Triton answers: the asked-for outputs as raw little-endian bytes
        for output in outputs:
            if every or output["name"] in binary:
                dtype = np.float64 if output["datatype"] == "FP64" else np.int64
                raw = np.asarray(output.pop("data"), dtype=dtype).tobytes()
                output["parameters"] = {**output["parameters"], "binary_data_size": len(raw)}
                chunks.append(raw)
        head = orjson.dumps(answer)
        return web.Response(
            body=head + b"".join(chunks),
            headers={"Inference-Header-Content-Length": str(len(head))},
            content_type="application/octet-stream",
        )


_NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def _input(tensor: dict[str, Any], tail: bytes) -> np.ndarray:
    dtype = _NUMPY[tensor["datatype"]]
    if "data" in tensor:
        return np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])
    size = tensor["parameters"]["binary_data_size"]
    return np.frombuffer(tail[:size], dtype=dtype).reshape(tensor["shape"])


def _output(name: str, model: Any, x: np.ndarray) -> dict[str, Any]:
    params = {"content_type": "np"}
    if name == "predict_proba":
        proba = model.predict_proba(x)
        return {
            "name": name,
            "shape": list(proba.shape),
            "datatype": "FP64",
            "parameters": params,
            "data": proba.ravel().tolist(),
        }
    predicted = model.predict(x)
    text = predicted.dtype.kind in "OUS"
    return {
        "name": name,
        "shape": [len(predicted), 1],
        "datatype": "BYTES" if text else "INT64",
        "parameters": params,
        "data": [str(v) for v in predicted] if text else predicted.astype(int).tolist(),
    }


def write_version(
    registry: Path,
    version: str,
    endpoint: str,
    *,
    datatype: str = "INT64",
    stage: str = "production",
    rule: str = "{output: predict}",
    binary: bool = False,
    declared: bool = True,
    extra: str = "",
) -> None:
    """registry/bc/<version>: a `framework: http` version of the stand-in's model
    (`binary`: whether the manifest says the upstream takes binary tensors; `declared`:
    whether it declares the outputs `predict` and `predict_proba`)."""
    directory = registry / "bc" / version
    directory.mkdir(parents=True)
    (directory / "model.yaml").write_text(
        f"name: bc\nversion: '{version}'\nframework: http\nendpoint: {endpoint}\n"
        f"stage: {stage}\ninputs: [{{name: input-0, datatype: FP64, shape: [-1, 30]}}]\n"
        + (
            f"outputs: [{{name: predict, datatype: {datatype}, shape: [-1, 1]}},\n"
            "          {name: predict_proba, datatype: FP64, shape: [-1, 2]}]\n"
            if declared
            else ""
        )
        + f"prediction: {rule}\nupstream: {{binary_tensors: {str(binary).lower()}}}\n{extra}"
    )
