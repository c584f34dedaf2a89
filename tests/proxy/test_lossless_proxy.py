"""Proxying to http upstreams loses nothing: bodies go as they came (binary included), or
as the same document in JSON to an upstream that takes no binary; the client's tracing
headers go along; an upstream's 4xx for the client's own input comes back as it was
and counts against no version; its 5xx is the version's 502."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_aio
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from tritonclient.http import InferInput, InferRequestedOutput

from tests.proxy.mlserver_standin import MLServerStandIn, write_version
from tests.proxy.support import serve, start_upstream

X, Y = load_breast_cancer(return_X_y=True)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def model() -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(X, Y)


@pytest.fixture
async def standin(model: Pipeline) -> AsyncIterator[tuple[MLServerStandIn, str]]:
    server = MLServerStandIn("bc", {"1": model, "2": model})
    runner, base = await start_upstream(server.application())
    try:
        yield server, base
    finally:
        await runner.cleanup()


def _request(rows: int) -> tuple[list[InferInput], list[InferRequestedOutput]]:
    tensor = InferInput("input-0", [rows, 30], "FP64")
    tensor.set_data_from_numpy(X[:rows], binary_data=True)
    return [tensor], [InferRequestedOutput("predict_proba", binary_data=True)]


@pytest.mark.parametrize("binary", [True, False], ids=["binary-upstream", "json-upstream"])
async def test_tritonclient_binary_request_with_outputs_reaches_the_upstream_whole(
    tmp_path: Path, standin: tuple[MLServerStandIn, str], model: Pipeline, binary: bool
) -> None:
    """Binary tensors and a requested binary `predict_proba`: an upstream taking the
    extension gets the client's very bytes; one that does not (MLServer) the same
    request as JSON, id, parameters and outputs included; the client gets its binary
    answer either way."""
    upstream, base = standin
    upstream.binary = binary
    registry = tmp_path / "registry"
    write_version(registry, "1", upstream.url(base, "1"), binary=binary)
    inputs, outputs = _request(4)
    params = {"content_type": "np", "trace": "yes"}
    async with serve(tmp_path, registry) as server:
        client = triton_aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            result = await client.infer(
                "bc",
                inputs,
                outputs=outputs,
                request_id="t-42",
                parameters=params,
                headers={"traceparent": TRACEPARENT},
            )
        finally:
            await client.close()
    proba = result.as_numpy("predict_proba")
    assert proba is not None
    np.testing.assert_allclose(proba, model.predict_proba(X[:4]))
    assert result.get_response()["id"] == "t-42"
    assert result.get_response()["model_version"] == "1"
    (seen,) = upstream.seen
    assert seen.doc is not None
    assert seen.doc["id"] == "t-42"
    assert seen.doc["parameters"] == params
    assert [o["name"] for o in seen.doc["outputs"]] == ["predict_proba"]
    assert seen.headers["traceparent"] == TRACEPARENT
    assert seen.headers["x-request-id"] == "t-42"
    assert "authorization" not in seen.headers
    sent, header_length = triton_http.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id="t-42", parameters=params
    )
    if binary:  # the client's bytes, as they came
        assert seen.body == sent
        assert seen.headers["inference-header-content-length"] == str(header_length)
    else:  # the same document as JSON: binary_data_size gone, data in its place
        assert "inference-header-content-length" not in seen.headers
        (tensor,) = seen.doc["inputs"]
        assert "parameters" not in tensor
        np.testing.assert_array_equal(np.asarray(tensor["data"]).reshape(4, 30), X[:4])


async def test_json_requests_go_byte_for_byte_with_input_parameters(
    tmp_path: Path, standin: tuple[MLServerStandIn, str]
) -> None:
    upstream, base = standin
    registry = tmp_path / "registry"
    write_version(registry, "1", upstream.url(base, "1"))
    tensor = {
        "name": "input-0",
        "datatype": "FP64",
        "shape": [2, 30],
        "parameters": {"content_type": "np"},
        "data": X[:2].ravel().tolist(),
    }
    body = orjson.dumps(
        {"id": "j-1", "parameters": {"content_type": "np"}, "inputs": [tensor],
         "outputs": [{"name": "predict"}, {"name": "predict_proba"}]}
    )  # fmt: skip
    async with (
        serve(tmp_path, registry) as server,
        aiohttp.ClientSession() as http,
        http.post(
            f"{server.url}/v2/models/bc/infer",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": "Bearer client"},
        ) as resp,
    ):
        assert resp.status == 200
        answer = await resp.json()
    (seen,) = upstream.seen
    assert seen.body == body
    assert "authorization" not in seen.headers  # not forwarded unless the operator opts in
    assert [o["name"] for o in answer["outputs"]] == ["predict", "predict_proba"]
    assert answer["outputs"][0]["parameters"] == {"content_type": "np"}  # relayed as it came
    assert answer["outputs"][0]["shape"] == [2, 1]
    assert answer["parameters"] == {} and answer["id"] == "j-1"
    assert answer["model_name"] == "bc" and answer["model_version"] == "1"


async def test_authorization_goes_along_when_the_operator_says_so(
    tmp_path: Path, standin: tuple[MLServerStandIn, str]
) -> None:
    upstream, base = standin
    registry = tmp_path / "registry"
    write_version(registry, "1", upstream.url(base, "1"))
    body = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 30],
                        "data": X[0].tolist()}]}  # fmt: skip
    async with (
        serve(tmp_path, registry, forward_authorization=True) as server,
        aiohttp.ClientSession() as http,
    ):
        headers = {"Authorization": "Bearer client", "x-request-id": "mine"}
        async with http.post(f"{server.url}/v2/models/bc/infer", json=body, headers=headers) as r:
            assert r.status == 200
    (seen,) = upstream.seen
    assert seen.headers["authorization"] == "Bearer client"
    assert seen.headers["x-request-id"] == "mine"


async def test_manifest_headers_come_from_the_environment(
    tmp_path: Path, standin: tuple[MLServerStandIn, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream, base = standin
    registry = tmp_path / "registry"
    extra = "upstream: {binary_tensors: false, headers_from_env: {X-Api-Key: BC_KEY}}\n"
    write_version(registry, "1", upstream.url(base, "1"), extra="")
    manifest = registry / "bc" / "1" / "model.yaml"
    manifest.write_text(manifest.read_text().replace("upstream: {binary_tensors: false}\n", extra))
    write_version(registry, "2", upstream.url(base, "2"), stage="staging")
    (registry / "bc" / "2" / "model.yaml").write_text(
        (registry / "bc" / "2" / "model.yaml")
        .read_text()
        .replace("upstream: {binary_tensors: false}\n", extra.replace("BC_KEY", "BC_MISSING"))
    )
    monkeypatch.setenv("BC_KEY", "s3cret")
    monkeypatch.delenv("BC_MISSING", raising=False)
    body = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 30],
                        "data": X[0].tolist()}]}  # fmt: skip
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v2/models/bc/infer", json=body) as resp:
            assert resp.status == 200
        refused = server.running.registry.refused()
        assert "BC_MISSING" in refused[("bc", "2")]  # the version is refused, naming why
    (seen,) = upstream.seen
    assert seen.headers["x-api-key"] == "s3cret"


async def test_an_upstream_400_is_the_clients_and_a_500_the_versions(
    tmp_path: Path, standin: tuple[MLServerStandIn, str]
) -> None:
    upstream, base = standin
    registry = tmp_path / "registry"
    write_version(registry, "1", upstream.url(base, "1"), declared=False)  # outputs unknown
    body: dict[str, Any] = {
        "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 30],
                    "data": X[0].tolist()}],
        "outputs": [{"name": "nope"}],
    }  # fmt: skip
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        infer = f"{server.url}/v2/models/bc/infer"
        async with http.post(infer, json=body) as resp:
            assert resp.status == 400  # MLServer's own answer, as it came
            assert resp.headers["x-rollguard-variant"] == "1"
            error = (await resp.json())["error"]
            assert "only supports 'predict', 'predict_proba'" in error
        window = server.gateway.windows.get("bc", "1")
        assert (window.requests, window.errors) == (0, 0)  # not the version's failure
        upstream.failing.add("1")
        del body["outputs"]
        async with http.post(infer, json=body) as resp:
            assert resp.status == 502
        assert (window.requests, window.errors) == (1, 1)
        async with http.get(f"{server.admin_url}/metrics") as resp:
            text = await resp.text()
        assert 'code="502",model="bc",role="stable",version="1"} 1.0' in text
        assert 'code="400"' not in text


async def test_a_600_kb_binary_tensor_goes_as_binary(
    tmp_path: Path, standin: tuple[MLServerStandIn, str], model: Pipeline
) -> None:
    """~600 KB of FP64 rows: the upstream receives exactly the client's bytes (the JSON
    re-encoding this replaced made 1.6 MB of it)."""
    upstream, base = standin
    upstream.binary = True
    registry = tmp_path / "registry"
    write_version(registry, "1", upstream.url(base, "1"), binary=True)
    rows = 2500
    x = np.resize(X, (rows, 30))
    tensor = InferInput("input-0", [rows, 30], "FP64")
    tensor.set_data_from_numpy(x, binary_data=True)
    out = [InferRequestedOutput("predict", binary_data=True)]
    async with serve(tmp_path, registry, max_body_bytes=2 * 1024 * 1024) as server:
        client = triton_aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            result = await client.infer("bc", [tensor], outputs=out)
        finally:
            await client.close()
    sent, _ = triton_http.InferenceServerClient.generate_request_body([tensor], outputs=out)
    (seen,) = upstream.seen
    assert len(sent) > 600_000
    assert seen.body == sent  # bytes sent upstream = bytes received
    predicted = result.as_numpy("predict")
    assert predicted is not None
    np.testing.assert_array_equal(predicted.ravel(), model.predict(x))
