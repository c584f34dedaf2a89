"""The V2 gRPC API on its own port: tritonclient.grpc and raw gRPC calls over loopback,
routed and counted exactly as REST, errors as gRPC status codes."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from rollguard.serving.demo.build import load_eval_data
from rollguard.serving.v2grpc import method, pb
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import Server, serve

X, Y = load_eval_data()
MODEL = "fraud-onnx"
SPLIT = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: split}
spec:
  model: fraud-onnx
  stable: "1.0.0"
  candidate: "1.1.0"
  strategy: canary
  split: hash
  key: header:x-user-id
  steps:
    - {weight: 50, hold: 1h, min_requests: 100000}
  interval: 1s
  checks:
    - {metric: error_rate, max: 0.5, min_samples: 100000, on_fail: alert}
"""


@pytest.fixture
async def server(tmp_path: Path, make_registry: MakeRegistry) -> AsyncIterator[Server]:
    registry = make_registry(f"{MODEL}/1.0.0", f"{MODEL}/1.1.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "split.yaml").write_text(SPLIT)
    async with serve(tmp_path, registry, policies=policies) as running:
        yield running


def _rows(start: int, n: int) -> np.ndarray:
    return np.ascontiguousarray(X[start : start + n], dtype=np.float32)


def _triton_inputs(rows: np.ndarray) -> list[triton.InferInput]:
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)  # raw_input_contents: tritonclient's binary form
    return [tensor]


async def test_tritonclient_grpc_health_metadata_and_infer(server: Server) -> None:
    client = triton_aio.InferenceServerClient(server.grpc_target)
    try:
        assert await client.is_server_live()
        assert await client.is_server_ready()
        assert await client.is_model_ready(MODEL)
        assert await client.is_model_ready(MODEL, "1.1.0")
        meta = await client.get_server_metadata(as_json=True)
        assert meta["name"] == "rollguard" and "statistics" in meta["extensions"]
        model = await client.get_model_metadata(MODEL, as_json=True)
        assert model["name"] == MODEL and model["versions"] == ["1.0.0", "1.1.0"]
        assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "30"]}]
        assert {o["name"] for o in model["outputs"]} == {"label", "probabilities"}

        rows = _rows(0, 4)
        result = await client.infer(
            MODEL,
            _triton_inputs(rows),
            outputs=[triton.InferRequestedOutput("probabilities")],
            request_id="req-1",
            model_version="1.0.0",
        )
        answer = result.get_response()
        assert answer.id == "req-1" and answer.model_version == "1.0.0"
        assert [o.name for o in answer.outputs] == ["probabilities"]
        probabilities = result.as_numpy("probabilities")
        assert probabilities.shape == (4, 2)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)

        everything = await client.infer(MODEL, _triton_inputs(rows), model_version="1.0.0")
        labels = everything.as_numpy("label")
        assert labels.dtype == np.int64 and labels.shape == (4,)
        assert (labels == probabilities.argmax(axis=1)).all()
    finally:
        await client.close()


async def test_tritonclients_blocking_client_as_its_examples_use_it(server: Server) -> None:
    """tritonclient.grpc's own (blocking) client, as Triton's example programs call it,
    from a thread: the gateway's loop must not be blocked by the test's client."""

    def run() -> tuple[bool, dict[str, object], list[int]]:
        client = triton.InferenceServerClient(server.grpc_target)
        try:
            live = client.is_server_live() and client.is_model_ready(MODEL)
            metadata = client.get_model_metadata(MODEL, as_json=True)
            result = client.infer(MODEL, _triton_inputs(_rows(0, 3)), request_id="sync")
            return live, metadata, result.as_numpy("label").tolist()
        finally:
            client.close()

    live, metadata, labels = await asyncio.to_thread(run)
    assert live and metadata["name"] == MODEL and len(labels) == 3


async def test_typed_contents_and_metadata(server: Server) -> None:
    """Typed `contents` (no raw bytes) answer the same as raw; the answering version and
    the request id come in the trailing metadata, model_version in the message."""
    rows = _rows(10, 3)
    typed = pb.ModelInferRequest(model_name=MODEL, id="typed")
    tensor = typed.inputs.add(name="input", datatype="FP32", shape=rows.shape)
    tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    raw = pb.ModelInferRequest(model_name=MODEL)
    raw.inputs.add(name="input", datatype="FP32", shape=rows.shape)
    raw.raw_input_contents.append(rows.tobytes())
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        infer = method(channel, "ModelInfer", pb.ModelInferResponse)
        call = infer(typed.SerializeToString(), metadata=(("x-user-id", "u-1"),))
        answer = await call
        trailing = dict(await call.trailing_metadata() or ())
        raw_answer = await infer(raw.SerializeToString(), metadata=(("x-user-id", "u-1"),))
    assert answer.id == "typed"
    assert trailing["x-rollguard-variant"] == answer.model_version in ("1.0.0", "1.1.0")
    assert trailing["x-request-id"] == "typed"
    assert [o.name for o in answer.outputs] == ["label", "probabilities"]
    assert list(answer.raw_output_contents) == list(raw_answer.raw_output_contents)
    labels = np.frombuffer(answer.raw_output_contents[0], dtype=np.int64)
    assert labels.shape == (3,)


async def test_grpc_and_rest_are_routed_and_counted_alike(server: Server) -> None:
    """The same rows with the same user keys, once over REST and once over gRPC: the
    same answers from the same variants, and each variant's window and request metric
    grow by the same counts; a gRPC request's id takes feedback at the REST endpoint."""
    n = 40
    keys = [f"user-{i}" for i in range(n)]
    inference = server.gateway

    def counts() -> dict[str, tuple[int, int]]:
        return {
            v: (inference.windows.get(MODEL, v).routed, inference.windows.get(MODEL, v).requests)
            for v in ("1.0.0", "1.1.0")
        }

    async with aiohttp.ClientSession() as http:
        before = counts()
        metrics_before = await _requests_metric(http, server)
        rest: dict[str, tuple[str, list[int]]] = {}
        for i, key in enumerate(keys):
            body = {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, 30],
                        "data": _rows(i, 1).ravel().tolist(),
                    }
                ],
                "outputs": [{"name": "label"}],
            }
            url = f"{server.url}/v2/models/{MODEL}/infer"
            async with http.post(url, json=body, headers={"x-user-id": key}) as r:
                assert r.status == 200, await r.text()
                doc = await r.json()
                rest[key] = (r.headers["x-rollguard-variant"], doc["outputs"][0]["data"])
        after_rest = counts()
        metrics_rest = await _requests_metric(http, server)

        client = triton_aio.InferenceServerClient(server.grpc_target)
        served: dict[str, tuple[str, list[int]]] = {}
        try:
            for i, key in enumerate(keys):
                result = await client.infer(
                    MODEL,
                    _triton_inputs(_rows(i, 1)),
                    outputs=[triton.InferRequestedOutput("label")],
                    request_id=f"grpc-{i}",
                    headers={"x-user-id": key},
                )
                answer = result.get_response()
                served[key] = (answer.model_version, result.as_numpy("label").tolist())
        finally:
            await client.close()
        after_grpc = counts()
        metrics_grpc = await _requests_metric(http, server)

        labels = [{"id": f"grpc-{i}", "label": int(Y[i])} for i in range(n)]
        async with http.post(f"{server.url}/v2/models/{MODEL}/feedback", json=labels) as r:
            assert r.status == 200, await r.text()
            assert len((await r.json())["accepted"]) == n

    assert served == rest
    assert {v for v, _ in served.values()} == {"1.0.0", "1.1.0"}  # both variants served
    for v in ("1.0.0", "1.1.0"):
        by_rest = [a - b for a, b in zip(after_rest[v], before[v], strict=True)]
        by_grpc = [a - b for a, b in zip(after_grpc[v], after_rest[v], strict=True)]
        assert by_rest == by_grpc and by_rest[0] > 0
    rest_delta = {k: metrics_rest.get(k, 0) - metrics_before.get(k, 0) for k in metrics_rest}
    grpc_delta = {k: metrics_grpc.get(k, 0) - metrics_rest.get(k, 0) for k in metrics_grpc}
    assert {k: v for k, v in rest_delta.items() if v} == {k: v for k, v in grpc_delta.items() if v}
    labelled = sum(inference.windows.get(MODEL, v).evidence().labelled for v in ("1.0.0", "1.1.0"))
    assert labelled >= n


async def _requests_metric(http: aiohttp.ClientSession, server: Server) -> dict[str, float]:
    async with http.get(f"{server.admin_url}/metrics") as r:
        text = await r.text()
    found = {}
    for line in text.splitlines():
        match = re.match(r'rollguard_requests_total\{([^}]*model="fraud-onnx"[^}]*)\} (\S+)', line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


async def test_errors_are_grpc_codes_with_the_rest_messages(server: Server) -> None:
    """Unknown model NOT_FOUND, a bad shape INVALID_ARGUMENT (counted against no version),
    bytes that are no message INVALID_ARGUMENT, each with REST's message."""
    inference = server.gateway
    before = {v: inference.windows.get(MODEL, v).requests for v in ("1.0.0", "1.1.0")}
    client = triton_aio.InferenceServerClient(server.grpc_target)
    try:
        with pytest.raises(InferenceServerException) as unknown:
            await client.infer("no-such-model", _triton_inputs(_rows(0, 1)))
        assert unknown.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as ready:
            await client.is_model_ready("no-such-model")
        assert ready.value.status() == "StatusCode.NOT_FOUND"
        bad = triton.InferInput("input", [1, 29], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 29), dtype=np.float32))
        with pytest.raises(InferenceServerException) as shape:
            await client.infer(MODEL, [bad], headers={"x-user-id": "someone"})
        assert shape.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "shape [1, 29] does not match declared [-1, 30]" in str(shape.value.message())
    finally:
        await client.close()
    async with aiohttp.ClientSession() as http:
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 29],
                            "data": [0.0] * 29}]}  # fmt: skip
        async with http.post(f"{server.url}/v2/models/{MODEL}/infer", json=body) as r:
            assert r.status == 400
            assert (await r.json())["error"] in str(shape.value.message())
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        infer = method(channel, "ModelInfer", pb.ModelInferResponse)
        with pytest.raises(grpc.aio.AioRpcError) as garbage:
            await infer(b"\xff\xff\xff\xff not a message")
        assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = {v: inference.windows.get(MODEL, v).requests for v in ("1.0.0", "1.1.0")}
    assert after == before


async def test_a_huge_message_is_refused_and_the_port_keeps_serving(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """A message over max_body_bytes: RESOURCE_EXHAUSTED before it is read whole; the
    next call is answered."""
    registry = make_registry(f"{MODEL}/1.0.0")
    async with serve(tmp_path, registry, max_body_bytes=64 * 1024) as running:
        client = triton_aio.InferenceServerClient(running.grpc_target)
        try:
            huge = _rows(0, 1).repeat(1000, axis=0)  # 120 KB of raw contents
            with pytest.raises(InferenceServerException) as refused:
                await client.infer(MODEL, _triton_inputs(huge))
            assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            result = await client.infer(MODEL, _triton_inputs(_rows(0, 2)))
            assert result.as_numpy("label").shape == (2,)
        finally:
            await client.close()


async def test_credentials_and_rate_limits_come_from_the_call_metadata(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """The data plane's gate over gRPC: no key UNAUTHENTICATED, a key for another model
    PERMISSION_DENIED, the caller's bucket empty RESOURCE_EXHAUSTED with Retry-After."""
    key, other = "app-key-0123456789abcdef", "other-key-0123456789abcd"
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        "keys:\n"
        f"  - {{name: app, sha256: {hashlib.sha256(key.encode()).hexdigest()}, "
        f"scopes: [infer], models: [{MODEL}]}}\n"
        f"  - {{name: other, sha256: {hashlib.sha256(other.encode()).hexdigest()}, "
        "scopes: [infer], models: [digits]}\n"
    )
    auth = {"required": True, "api_keys_file": str(keys)}
    limits = {"default": {"rate": 0.01, "burst": 2}}
    registry = make_registry(f"{MODEL}/1.0.0")
    async with (
        serve(tmp_path, registry, data_auth=auth, rate_limits=limits) as running,
        grpc.aio.insecure_channel(running.grpc_target) as channel,
    ):
        infer = method(channel, "ModelInfer", pb.ModelInferResponse)
        message = pb.ModelInferRequest(model_name=MODEL)
        message.inputs.add(name="input", datatype="FP32", shape=[1, 30])
        message.raw_input_contents.append(_rows(0, 1).tobytes())
        body = message.SerializeToString()

        async def code(metadata: tuple[tuple[str, str], ...]) -> grpc.aio.AioRpcError | None:
            try:
                await infer(body, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                return exc
            return None

        missing = await code(())
        assert missing is not None and missing.code() == grpc.StatusCode.UNAUTHENTICATED
        assert f"model {MODEL!r} needs a credential" in str(missing.details())
        wrong = await code((("authorization", f"Bearer {other}"),))
        assert wrong is not None and wrong.code() == grpc.StatusCode.PERMISSION_DENIED
        assert await code((("authorization", f"Bearer {key}"),)) is None
        assert await code((("authorization", f"Bearer {key}"),)) is None
        limited = await code((("authorization", f"Bearer {key}"),))
        assert limited is not None and limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(limited.trailing_metadata() or ())["retry-after"]) >= 1
        health = method(channel, "ServerLive", pb.ServerLiveResponse)
        assert (await health(b"")).live  # health needs no credential


async def test_grpc_can_be_turned_off(tmp_path: Path, make_registry: MakeRegistry) -> None:
    registry = make_registry(f"{MODEL}/1.0.0")
    async with serve(tmp_path, registry, grpc_enabled=False) as running:
        assert running.running.grpc_port == 0
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{running.url}/v2/health/ready") as r,
        ):
            assert r.status == 200  # REST serves on


async def test_tritons_statistics_extension_over_grpc(server: Server) -> None:
    """tritonclient.grpc's get_inference_statistics, as Triton's example programs call it:
    the versions of the model, with the gRPC calls counted."""
    client = triton_aio.InferenceServerClient(server.grpc_target)
    try:
        await client.infer(MODEL, _triton_inputs(_rows(0, 3)), model_version="1.1.0")
        stats = await client.get_inference_statistics(MODEL, as_json=True)
        assert [s["version"] for s in stats["model_stats"]] == ["1.0.0", "1.1.0"]
        one = await client.get_inference_statistics(MODEL, "1.1.0")
        assert len(one.model_stats) == 1
        used = one.model_stats[0]
        assert used.inference_count == 3 and used.inference_stats.success.count == 1
        everything = await client.get_inference_statistics()
        assert {s.name for s in everything.model_stats} == {MODEL}
        with pytest.raises(InferenceServerException) as unknown:
            await client.get_inference_statistics("no-such-model")
        assert unknown.value.status() == "StatusCode.NOT_FOUND"
    finally:
        await client.close()


async def test_request_ids_over_256_characters_are_invalid_arguments(server: Server) -> None:
    """As over REST: in the call's metadata or the message's id."""
    rows = _rows(0, 1)
    long_id = pb.ModelInferRequest(model_name=MODEL, id="i" * 300)
    long_id.inputs.add(name="input", datatype="FP32", shape=rows.shape)
    long_id.raw_input_contents.append(rows.tobytes())
    plain = pb.ModelInferRequest(model_name=MODEL)
    plain.CopyFrom(long_id)
    plain.id = ""
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        infer = method(channel, "ModelInfer", pb.ModelInferResponse)
        for body, metadata in (
            (long_id.SerializeToString(), ()),
            (plain.SerializeToString(), (("x-request-id", "i" * 257),)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await infer(body, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "at most 256 are taken" in (refused.value.details() or "")
        call = infer(plain.SerializeToString(), metadata=(("x-request-id", "i" * 256),))
        await call
        trailing = dict(await call.trailing_metadata() or ())
    assert trailing["x-request-id"] == "i" * 256
