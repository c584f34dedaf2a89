"""End-to-end: the real gateway on loopback, driven by tritonclient and plain aiohttp."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
import tritonclient.http.aio as triton_aio
from tritonclient.http import InferInput, InferRequestedOutput

from rollguard.serving.demo.build import load_eval_data
from rollguard.serving.manifest import load_manifest
from rollguard.serving.messages import InferRequest
from rollguard.serving.runners import create_runner
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import serve, start_upstream, write_remote_version


async def _direct_predictions(
    registry: Path, model: str, version: str, x: np.ndarray
) -> np.ndarray:
    directory = registry / model / version
    runner = create_runner(load_manifest(directory / "model.yaml"), directory)
    await runner.load()
    try:
        return (await runner.predict(InferRequest.of_arrays({"input": x}))).arrays()["label"]
    finally:
        await runner.unload()


async def test_tritonclient_metadata_infer_and_pinned(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry(
        "fraud/1.0.0", "fraud/1.1.0", "fraud-onnx/1.0.0", "fraud-torch/1.0.0", "fraud-torch/1.1.0"
    )
    x, _ = load_eval_data()
    async with serve(tmp_path, registry) as server:
        client = triton_aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready("fraud")
            meta = await client.get_model_metadata("fraud")
            assert meta["name"] == "fraud"
            assert meta["versions"] == ["1.0.0", "1.1.0"]
            assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
            assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
            server_meta = await client.get_server_metadata()
            assert server_meta["name"] == "rollguard"

            for model in ("fraud", "fraud-onnx", "fraud-torch"):
                for binary in (False, True):
                    inp = InferInput("input", list(x[:16].shape), "FP32")
                    inp.set_data_from_numpy(x[:16], binary_data=binary)
                    out = InferRequestedOutput("label", binary_data=binary)
                    result = await client.infer(model, [inp], outputs=[out], request_id="t-1")
                    version = result.get_response()["model_version"]
                    expected = await _direct_predictions(registry, model, version, x[:16])
                    np.testing.assert_array_equal(result.as_numpy("label"), expected)
                    assert result.get_response()["id"] == "t-1"
                    assert result.as_numpy("probabilities") is None  # not requested

            inp = InferInput("input", [4, 30], "FP32")
            inp.set_data_from_numpy(x[:4], binary_data=False)
            pinned = await client.infer("fraud", [inp], model_version="1.1.0")
            assert pinned.get_response()["model_version"] == "1.1.0"
            # torch.export (.pt2) through a pinned version.
            pt2 = await client.infer("fraud-torch", [inp], model_version="1.1.0")
            expected = await _direct_predictions(registry, "fraud-torch", "1.1.0", x[:4])
            np.testing.assert_array_equal(pt2.as_numpy("label"), expected)
            # Pinned calls never count in windows.
            assert server.gateway.windows.get("fraud", "1.1.0").requests == 0
        finally:
            await client.close()


async def test_plain_http_predict_feedback_and_accuracy(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0")
    x, y = load_eval_data()
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        ids = []
        for i in range(40):
            body = {"features": x[i].tolist(), "id": f"req-{i}"}
            async with http.post(f"{server.url}/predict/fraud", json=body) as resp:
                assert resp.status == 200
                assert resp.headers["x-rollguard-variant"] == "1.0.0"
                assert resp.headers["x-request-id"] == f"req-{i}"
                doc = await resp.json()
                assert set(doc["predictions"]) == {"label", "probabilities"}
                ids.append(doc["id"])
        async with http.post(
            f"{server.url}/predict/fraud", json={"instances": [x[0].tolist(), x[1].tolist()]}
        ) as resp:
            doc = await resp.json()
            assert len(doc["predictions"]) == 2
            assert resp.headers["x-request-id"] == doc["id"]  # generated when not given
        labels = [{"id": rid, "label": int(y[i])} for i, rid in enumerate(ids)]
        async with http.post(f"{server.url}/v2/models/fraud/feedback", json=labels) as resp:
            assert resp.status == 200
            doc = await resp.json()
            assert len(doc["accepted"]) == 40 and doc["unknown"] == []
        window = server.gateway.windows.get("fraud", "1.0.0")
        evidence = window.evidence()
        expected = await _direct_predictions(registry, "fraud", "1.0.0", x[:40])
        assert evidence.labelled == 40
        assert evidence.correct == int((expected == y[:40]).sum())
        # A label for an unknown id is a 404 with a V2 error body; a repeat label too.
        async with http.post(
            f"{server.url}/v2/models/fraud/feedback", json={"id": "req-0", "label": 1}
        ) as resp:
            assert resp.status == 404
            assert "error" in await resp.json()
        async with http.get(f"{server.admin_url}/metrics") as resp:
            text = await resp.text()
            series = (
                'rollguard_requests_total{code="200",model="fraud",role="stable",version="1.0.0"}'
            )
            assert f"{series} 41.0" in text
            assert "rollguard_feedback_labels_total" in text


async def test_every_error_status(tmp_path: Path, make_registry: MakeRegistry) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.2.0")
    x, _ = load_eval_data()
    good = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": x[0].tolist()}]
    }
    async with (
        serve(tmp_path, registry, max_body_bytes=64 * 1024) as server,
        aiohttp.ClientSession() as http,
    ):
        infer = f"{server.url}/v2/models/fraud/infer"
        bad_bodies = [
            b"not json",
            b"[]",
            b'{"inputs": []}',
            b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 29], "data": []}]}',
            b'{"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 30], "data": '
            + str([0.0] * 30).encode()
            + b"}]}",
            b'{"inputs": [{"name": "other", "datatype": "FP32", "shape": [1], "data": [1]}]}',
            b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": ["x"]}]}',
        ]
        for body in bad_bodies:
            async with http.post(infer, data=body) as resp:
                assert resp.status == 400, body
                assert "error" in await resp.json()
                assert resp.headers["x-request-id"]  # every response, errors included
        async with http.post(infer, json={**good, "outputs": [{"name": "nope"}]}) as resp:
            assert resp.status == 400
        # Bad input counted against no variant.
        assert server.gateway.windows.get("fraud", "1.0.0").requests == 0
        for url in (
            f"{server.url}/v2/models/nope/infer",
            f"{server.url}/v2/models/fraud/versions/9.9.9/infer",
        ):
            async with http.post(url, json=good) as resp:
                assert resp.status == 404
                assert "error" in await resp.json()
        async with http.get(f"{server.url}/v2/models/nope") as resp:
            assert resp.status == 404
        # Paths and methods no route takes: JSON errors with a request id too.
        async with http.get(f"{server.url}/no/such/path") as resp:
            assert resp.status == 404
            assert "GET /no/such/path" in (await resp.json())["error"]
            assert resp.headers["x-request-id"]
        async with http.get(infer, headers={"x-request-id": "r-405"}) as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "POST"
            assert "error" in await resp.json()
            assert resp.headers["x-request-id"] == "r-405"
        async with http.post(infer, data=b"x" * (65 * 1024)) as resp:
            assert resp.status == 413
            assert "error" in await resp.json()
        # A model error is a 500 counted against that version only.
        faulty = f"{server.url}/v2/models/fraud/versions/1.2.0/infer"
        statuses = []
        for i in range(60):
            row = {
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 30], "data": x[i].tolist()}
                ]
            }
            async with http.post(faulty, json=row) as resp:
                statuses.append(resp.status)
                assert resp.headers["x-rollguard-variant"] == "1.2.0"
                assert resp.headers["x-request-id"]
                if resp.status != 200:
                    assert "error" in await resp.json()
        assert set(statuses) <= {200, 500} and 500 in statuses


async def _upstream(mode: str) -> tuple[aiohttp.web.AppRunner, str]:
    from aiohttp import web

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def infer(request: web.Request) -> web.Response:
        if mode == "fail":
            return web.json_response({"error": "upstream exploded"}, status=500)
        if mode == "ok":  # label: is the row's sum positive; score: the sum
            doc = await request.json()
            x = np.asarray(doc["inputs"][0]["data"], dtype=np.float32).reshape(-1, 2)
            sums = x.sum(axis=1)
            outputs = [
                {"name": "label", "datatype": "INT64", "shape": [len(x)],
                 "data": (sums > 0).astype(int).tolist()},
                {"name": "score", "datatype": "FP32", "shape": [len(x)], "data": sums.tolist()},
            ]  # fmt: skip
            return web.json_response(
                {"model_name": "m", "model_version": "upstream-7", "id": doc.get("id"),
                 "outputs": outputs}
            )  # fmt: skip
        await asyncio.sleep(2.0)  # slower than the manifest's timeout
        return web.json_response({"outputs": []})

    app = web.Application()
    app.router.add_get("/v2/models/m/ready", ready)
    app.router.add_post("/v2/models/m/infer", infer)
    runner, base = await start_upstream(app)
    return runner, f"{base}/v2/models/m"


@pytest.mark.parametrize(("mode", "status"), [("fail", 502), ("slow", 504)])
async def test_upstream_failure_and_timeout(tmp_path: Path, mode: str, status: int) -> None:
    upstream, endpoint = await _upstream(mode)
    registry = tmp_path / "registry" / "remote" / "1"
    registry.mkdir(parents=True)
    (registry / "model.yaml").write_text(
        f"name: remote\nversion: '1'\nframework: http\nendpoint: {endpoint}\nstage: production\n"
        "timeout_s: 0.3\ninputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\n"
    )
    try:
        async with (
            serve(tmp_path, tmp_path / "registry") as server,
            aiohttp.ClientSession() as http,
        ):
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
            async with http.post(f"{server.url}/v2/models/remote/infer", json=body) as resp:
                assert resp.status == status
                assert "error" in await resp.json()
            window = server.gateway.windows.get("remote", "1")
            assert (window.requests, window.errors) == (1, 1)
    finally:
        await upstream.cleanup()


async def test_overload_answers_503_with_retry_after(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.3.0")  # the slow version: about 50 ms a call
    (registry / "fraud" / "1.3.0")  # stage is not production: pin it
    x, _ = load_eval_data()
    row = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": x[0].tolist()}]
    }
    async with serve(tmp_path, registry, max_inflight=2) as server, aiohttp.ClientSession() as http:
        url = f"{server.url}/v2/models/fraud/versions/1.3.0/infer"

        async def one() -> tuple[int, str | None]:
            async with http.post(url, json=row) as resp:
                return resp.status, resp.headers.get("Retry-After")

        results = await asyncio.gather(*(one() for _ in range(12)))
        assert {s for s, _ in results} == {200, 503}
        assert all(r == "1" for s, r in results if s == 503)
        # No production version and no rollout: the model is not ready to serve.
        async with http.post(f"{server.url}/v2/models/fraud/infer", json=row) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"


async def test_proxy_mode_answers_as_rollguard_and_records_predictions(tmp_path: Path) -> None:
    upstream, endpoint = await _upstream("ok")
    write_remote_version(
        tmp_path / "registry",
        "1",
        endpoint,
        "[{name: label, datatype: INT64, shape: [-1]}, {name: score, datatype: FP32, shape: [-1]}]",
    )
    rows = [[1.0, 2.0], [-3.0, 1.0]]
    body = {
        "id": "p-1",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": rows}],
    }
    try:
        async with (
            serve(tmp_path, tmp_path / "registry") as server,
            aiohttp.ClientSession() as http,
        ):
            url = f"{server.url}/v2/models/remote/infer"
            async with http.post(url, json=body) as resp:
                assert resp.status == 200
                assert resp.headers["x-rollguard-variant"] == "1"
                doc = await resp.json()
            assert (doc["model_name"], doc["model_version"], doc["id"]) == ("remote", "1", "p-1")
            by_name = {o["name"]: o for o in doc["outputs"]}
            assert by_name["label"]["data"] == [1, 0]
            assert by_name["score"]["data"] == [3.0, -2.0]
            # Requested outputs take the decoding path and are honoured.
            async with http.post(url, json={**body, "outputs": [{"name": "score"}]}) as resp:
                assert [o["name"] for o in (await resp.json())["outputs"]] == ["score"]
            window = server.gateway.windows.get("remote", "1")
            assert (window.requests, window.errors) == (2, 0)
            # Each row's recorded prediction takes its label; a reused id keeps pointing at
            # its first request.
            feedback = {"id": "p-1", "label": [1, 1]}
            async with http.post(f"{server.url}/v2/models/remote/feedback", json=feedback) as resp:
                assert await resp.json() == {"accepted": ["p-1"], "unknown": [], "expired": []}
            assert (window.evidence().labelled, window.evidence().correct) == (2, 1)
    finally:
        await upstream.cleanup()


async def test_proxy_mode_checks_flat_json_without_numpy_and_keeps_drift_rows(
    tmp_path: Path,
) -> None:
    """Plain flat-data bodies are checked unconverted: bad ones are refused with numpy's
    messages and counted against no one; good ones still give a drift check its rows."""
    upstream, endpoint = await _upstream("ok")
    write_remote_version(tmp_path / "registry", "1", endpoint)

    def body(shape: list[int], data: list[Any], datatype: str = "FP32") -> dict[str, Any]:
        return {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}

    try:
        async with (
            serve(tmp_path, tmp_path / "registry") as server,
            aiohttp.ClientSession() as http,
        ):
            window = server.gateway.windows.ensure("remote", "1", 16, input_width=2)
            url = f"{server.url}/v2/models/remote/infer"
            refused = [
                (body([3], [1.0, 2.0, 3.0]), "shape [3] does not match declared [-1, 2]"),
                (body([1, 2], [1, 2], "INT64"), "datatype INT64 does not match declared FP32"),
                (body([1, 2], [1.0]), "needs 2 values, data has 1"),
                (body([1, 2], [1.0, "a"]), "does not fit FP32"),
            ]
            for doc, message in refused:
                async with http.post(url, json=doc) as resp:
                    assert resp.status == 400
                    assert message in (await resp.json())["error"]
            for row in ([1.0, 2.0], [-4.0, 1.0]):
                async with http.post(url, json=body([1, 2], row)) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["outputs"][0]["data"] == [int(sum(row) > 0)]
            evidence = window.evidence()
            assert (evidence.requests, evidence.errors) == (2, 0)
            assert evidence.inputs is not None
            np.testing.assert_array_equal(evidence.inputs, [[1.0, 2.0], [-4.0, 1.0]])
    finally:
        await upstream.cleanup()


async def test_proxy_mode_shadow_gets_the_clients_body_and_agrees(tmp_path: Path) -> None:
    """A remote shadow is sent the client's V2 body byte for byte (no re-encoding), and its
    answers are compared with the primary's."""
    from aiohttp import web

    bodies: list[bytes] = []

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def infer(request: web.Request) -> web.Response:
        raw = await request.read()
        bodies.append(raw)
        x = np.asarray(orjson.loads(raw)["inputs"][0]["data"], dtype=np.float32).reshape(-1, 2)
        label = {"name": "label", "datatype": "INT64", "shape": [len(x)],
                 "data": (x.sum(axis=1) > 0).astype(int).tolist()}  # fmt: skip
        return web.json_response({"model_name": "m", "outputs": [label]})

    app = web.Application()
    app.router.add_get("/v2/models/m/ready", ready)
    app.router.add_post("/v2/models/m/infer", infer)
    upstream, base = await start_upstream(app)
    endpoint = f"{base}/v2/models/m"
    for version in ("1", "2"):
        label = "[{name: label, datatype: INT64, shape: [-1]}]"
        write_remote_version(tmp_path / "registry", version, endpoint, label)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "remote.yaml").write_text(
        "apiVersion: rollguard/v1\nkind: Rollout\nmetadata: {name: remote}\n"
        "spec: {model: remote, stable: '1', candidate: '2', strategy: shadow, interval: 0.2s}\n"
    )
    try:
        async with (
            # Client and gateway share this loop, which reads as busy: never shed here.
            serve(tmp_path, tmp_path / "registry", policies=policies, shadow_budget=1.0) as server,
            aiohttp.ClientSession() as http,
        ):
            url = f"{server.url}/v2/models/remote/infer"
            while server.gateway.router.table("remote") is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # the policy loop has not applied the rollout yet
            sent = []
            for i in range(20):
                raw = orjson.dumps(
                    {"id": f"s-{i}", "inputs": [{"name": "x", "datatype": "FP32",
                     "shape": [1, 2], "data": [float(i) - 10.0, 1.0]}]}
                )  # fmt: skip
                sent.append(raw)
                async with http.post(url, data=raw) as resp:
                    assert resp.status == 200
                    assert resp.headers["x-rollguard-variant"] == "1"
            await server.gateway.shadow.drain()
            shadow = server.gateway.windows.get("remote", "2").evidence()
            assert shadow.compared == 20 and shadow.agreed == 20
            assert sorted(bodies) == sorted(sent + sent)  # primary and shadow: the same bytes
    finally:
        await upstream.cleanup()


async def test_metrics_on_the_admin_port_name_refused_versions(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """`rollguard_registry_refused` is read from the registry at scrape time: a version
    whose artifact does not match its sha256 shows as 1, a serving one not at all; and
    /metrics is the admin port's, not the data port's."""
    registry = make_registry("fraud/1.0.0")
    broken = registry / "fraud" / "9.9.9"
    broken.mkdir()
    (broken / "model.yaml").write_text(
        "name: fraud\nversion: '9.9.9'\nframework: onnx\nartifact: model.onnx\n"
        f"sha256: {'0' * 64}\nstage: staging\n"
    )
    (broken / "model.onnx").write_bytes(b"not the registered bytes")
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        async with http.get(f"{server.admin_url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert 'rollguard_registry_refused{model="fraud",version="9.9.9"} 1.0' in text
        assert 'rollguard_registry_refused{model="fraud",version="1.0.0"}' not in text
        async with http.get(f"{server.url}/metrics") as resp:
            assert resp.status == 404
            assert "error" in await resp.json()
