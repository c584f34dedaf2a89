"""HttpRunner against a real V2 server on loopback that serves a real scikit-learn model."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from rollguard.serving.demo import load_eval_data
from rollguard.serving.errors import (
    ArtifactError,
    NotReady,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
from rollguard.serving.manifest import parse_manifest
from rollguard.serving.messages import InferRequest
from rollguard.serving.runners.http import HttpRunner
from tests.serving.support import predict_arrays

MODEL_PATH = "/v2/models/fraud/versions/2"


@pytest.fixture(scope="module")
def model() -> Pipeline:
    x, y = load_breast_cancer(return_X_y=True)
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(x.astype(np.float32), y)


class Upstream:
    """A minimal V2 model server, written by hand so it does not share our codec."""

    def __init__(self, model: Pipeline) -> None:
        self.model = model
        self.ready = True
        self.fail = False
        self.status: int | None = None  # answer this status with an error body instead
        self.stall = False
        self.release = asyncio.Event()  # set at teardown: stalled handlers may finish
        self.url = ""
        self.transports: set[object] = set()  # every connection a request came on
        self.bodies: list[bytes] = []  # every infer body, as it arrived
        self.answer: bytes | None = None  # answer this 200 body instead of the model's

    @property
    def connections(self) -> int:
        return len(self.transports)

    async def handle_ready(self, request: web.Request) -> web.Response:
        self.transports.add(request.transport)
        if self.ready:
            return web.json_response({"name": "fraud", "ready": True})
        return web.json_response({"error": "model is loading"}, status=503)

    async def handle_infer(self, request: web.Request) -> web.Response:
        self.transports.add(request.transport)
        self.bodies.append(await request.read())
        doc = await request.json()
        if self.fail:
            return web.json_response({"error": "model exploded"}, status=500)
        if self.status is not None:
            return web.json_response({"error": "not for me"}, status=self.status)
        if self.stall:
            await self.release.wait()
        if self.answer is not None:
            return web.Response(body=self.answer, content_type="application/json")
        tensor = doc["inputs"][0]
        assert tensor["datatype"] == "FP32"
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        label = self.model.predict(x)
        probabilities = self.model.predict_proba(x).astype(np.float32)
        outputs = [
            {"name": "label", "datatype": "INT64", "shape": [len(x)], "data": label.tolist()},
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": list(probabilities.shape),
                "data": probabilities.ravel().tolist(),
            },
        ]
        body = {"model_name": "fraud", "model_version": "2", "outputs": outputs}
        return web.json_response(body)


@pytest.fixture
async def upstream(model: Pipeline) -> AsyncIterator[Upstream]:
    server = Upstream(model)
    app = web.Application()
    app.router.add_get(f"{MODEL_PATH}/ready", server.handle_ready)
    app.router.add_post(f"{MODEL_PATH}/infer", server.handle_infer)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    server.url = f"http://127.0.0.1:{sock.getsockname()[1]}{MODEL_PATH}"
    yield server
    server.release.set()
    await runner.cleanup()
    sock.close()


def _manifest_for(url: str, timeout_s: float = 5.0) -> Any:
    return parse_manifest(
        {
            "name": "fraud",
            "version": "2.0.0",
            "framework": "http",
            "endpoint": url,
            "timeout_s": timeout_s,
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
        },
        "test",
    )


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{MODEL_PATH}"


async def test_predictions_equal_the_direct_model_call(
    upstream: Upstream, model: Pipeline, tmp_path: Path
) -> None:
    runner = HttpRunner(_manifest_for(upstream.url), tmp_path)
    await runner.load()
    assert runner.ready
    x, _ = load_eval_data()
    got = await predict_arrays(runner, {"input": x})
    np.testing.assert_array_equal(got["label"], model.predict(x))
    assert got["probabilities"].dtype == np.float32
    np.testing.assert_array_equal(got["probabilities"], model.predict_proba(x).astype(np.float32))
    await runner.unload()
    assert not runner.ready


async def test_connections_are_kept_alive_and_closed_by_unload(
    upstream: Upstream, tmp_path: Path
) -> None:
    runner = HttpRunner(_manifest_for(upstream.url), tmp_path)
    await runner.load()
    x, _ = load_eval_data()
    for _ in range(3):
        await predict_arrays(runner, {"input": x[:2]})
    assert upstream.connections == 1  # the ready probe and three infers on one connection
    await runner.unload()
    with pytest.raises(NotReady, match="not loaded"):
        await predict_arrays(runner, {"input": x[:2]})
    await runner.load()  # a new pool, a new connection
    await predict_arrays(runner, {"input": x[:2]})
    assert upstream.connections == 2
    await runner.unload()


async def test_upstream_500_is_an_upstream_error(upstream: Upstream, tmp_path: Path) -> None:
    runner = HttpRunner(_manifest_for(upstream.url), tmp_path)
    await runner.load()
    upstream.fail = True
    x, _ = load_eval_data()
    with pytest.raises(UpstreamError, match="answered 500: model exploded") as info:
        await predict_arrays(runner, {"input": x[:2]})
    assert not isinstance(info.value, UpstreamTimeout)
    await runner.unload()


@pytest.mark.parametrize("status", [400, 401, 403, 409, 413, 415, 422, 431])
async def test_an_upstream_refusing_the_clients_request_is_passed_back_uncounted(
    upstream: Upstream, tmp_path: Path, status: int
) -> None:
    """431: headers too large, which only the client's forwarded headers can make (an
    Envoy in front of the upstream answers it); it was a 502 that counted towards an
    ejection (found by an adversarial probe)."""
    runner = HttpRunner(_manifest_for(upstream.url), tmp_path)
    await runner.load()
    upstream.status = status
    x, _ = load_eval_data()
    for _ in range(runner.health.eject_after + 1):
        with pytest.raises(UpstreamRejected) as info:
            await predict_arrays(runner, {"input": x[:1]})
        assert info.value.status == status
    assert runner.health.ok and runner.health.failed_calls == 0
    await runner.unload()


async def test_slow_upstream_is_an_upstream_timeout(upstream: Upstream, tmp_path: Path) -> None:
    runner = HttpRunner(_manifest_for(upstream.url, timeout_s=0.2), tmp_path)
    await runner.load()
    upstream.stall = True
    x, _ = load_eval_data()
    with pytest.raises(UpstreamTimeout, match=r"no answer within 0\.2 s"):
        await predict_arrays(runner, {"input": x[:2]})
    await runner.unload()


async def test_refused_connection_is_an_upstream_error(tmp_path: Path) -> None:
    url = _closed_port_url()
    runner = HttpRunner(_manifest_for(url), tmp_path)
    x, _ = load_eval_data()
    with pytest.raises(UpstreamError, match=f"{url}/infer: unreachable") as info:
        await predict_arrays(runner, {"input": x[:2]})
    assert not isinstance(info.value, UpstreamTimeout)
    with pytest.raises(ArtifactError, match="unreachable"):
        await runner.load()
    assert not runner.ready


async def test_ready_probe_gates_load(upstream: Upstream, tmp_path: Path) -> None:
    upstream.ready = False
    runner = HttpRunner(_manifest_for(upstream.url), tmp_path)
    with pytest.raises(ArtifactError, match=r"not ready.*503.*model is loading"):
        await runner.load()
    assert not runner.ready
    upstream.ready = True
    await runner.load()
    assert runner.ready
    await runner.unload()


def _infer_body(x: np.ndarray, **extra: Any) -> bytes:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel()}
    return orjson.dumps({"inputs": [tensor], **extra}, option=orjson.OPT_SERIALIZE_NUMPY)


async def test_a_plain_request_is_forwarded_byte_for_byte(
    upstream: Upstream, model: Pipeline, tmp_path: Path
) -> None:
    runner = HttpRunner(_manifest_for(upstream.url), tmp_path)
    await runner.load()
    x, _ = load_eval_data()
    body = _infer_body(x[:3], id="r7")
    answer = await runner.predict(InferRequest.decode(body))
    assert upstream.bodies == [body]
    # The answer stays the upstream's JSON until someone asks for arrays.
    assert [item["name"] for item in answer.items()] == ["label", "probabilities"]
    assert answer.prediction() == float(model.predict(x[:1])[0])
    np.testing.assert_array_equal(answer.arrays()["label"], model.predict(x[:3]))
    await runner.unload()


async def test_a_request_choosing_outputs_is_sent_as_it_came(
    upstream: Upstream, tmp_path: Path
) -> None:
    runner = HttpRunner(_manifest_for(upstream.url), tmp_path)
    await runner.load()
    x, _ = load_eval_data()
    body = _infer_body(x[:2], id="r8", outputs=[{"name": "label"}])
    await runner.predict(InferRequest.decode(body))
    assert upstream.bodies == [body]  # id and requested outputs as the client wrote them
    await runner.unload()


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (b"{not json", "invalid JSON"),
        (b'{"model_name": "fraud"}', "no 'outputs' list"),
        (b'{"outputs": [{"name": "label", "shape": [1], "data": [1]}]}', "outputs\\[0\\]"),
    ],
)
async def test_an_unreadable_answer_is_an_upstream_error(
    upstream: Upstream, tmp_path: Path, answer: bytes, fragment: str
) -> None:
    runner = HttpRunner(_manifest_for(upstream.url), tmp_path)
    await runner.load()
    upstream.answer = answer
    x, _ = load_eval_data()
    with pytest.raises(UpstreamError, match=fragment):
        await predict_arrays(runner, {"input": x[:2]})
    await runner.unload()
