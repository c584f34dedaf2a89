"""`framework: grpc` upstreams: a rollguard in front of another rollguard's gRPC port
(a real V2 gRPC server, nothing mocked), over REST and over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio

from rollguard.proxy.cli import main
from rollguard.serving.demo.build import load_eval_data
from rollguard.serving.manifest import load_manifest
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import Server, serve
from tests.serving.support import eventually

X, _ = load_eval_data()
SPLIT = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: remote}
spec:
  model: remote
  stable: "1.0.0"
  candidate: "1.2.0"
  strategy: canary
  split: hash
  key: header:x-user-id
  steps:
    - {weight: 50, hold: 1h, min_requests: 100000}
  interval: 1s
  checks:
    - {metric: error_rate, max: 0.9, min_samples: 100000, on_fail: alert}
"""


def _remote(registry: Path, version: str, target: str) -> None:
    """registry/remote/<version>: the backend's `fraud` <version> over gRPC."""
    directory = registry / "remote" / version
    directory.mkdir(parents=True)
    (directory / "model.yaml").write_text(
        f"name: remote\nversion: '{version}'\nframework: grpc\nendpoint: {target}\n"
        f"stage: production\nupstream: {{model: fraud, version: '{version}'}}\n"
        "inputs: [{name: input, datatype: FP32, shape: [-1, 30]}]\n"
        "outputs: [{name: label, datatype: INT64, shape: [-1]},"
        " {name: probabilities, datatype: FP32, shape: [-1, 2]}]\n"
        "prediction: {output: label}\n"
    )


@contextlib.asynccontextmanager
async def _front_and_back(
    tmp_path: Path, make_registry: MakeRegistry
) -> AsyncIterator[tuple[Server, Server]]:
    back_registry = make_registry("fraud/1.0.0", "fraud/1.2.0")  # 1.2.0 fails ~5 % of rows
    async with serve(tmp_path / "back", back_registry) as back:
        front_registry = tmp_path / "front-registry"
        _remote(front_registry, "1.0.0", f"grpc://{back.grpc_target}")
        _remote(front_registry, "1.2.0", back.grpc_target)  # host:port works as well
        policies = tmp_path / "front-policies"
        policies.mkdir()
        (policies / "remote.yaml").write_text(SPLIT)
        async with serve(tmp_path / "front", front_registry, policies=policies) as front:
            yield front, back


@pytest.mark.slow
async def test_front_over_a_grpc_upstream_routes_counts_and_fails_the_faulty_version(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    async with _front_and_back(tmp_path, make_registry) as (front, back):
        windows = front.gateway.windows
        statuses: dict[str, dict[int, int]] = {"1.0.0": {}, "1.2.0": {}}
        async with aiohttp.ClientSession() as http:
            for i in range(160):
                row = X[i % len(X)].tolist()
                body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30],
                                    "data": row}], "id": f"r{i}"}  # fmt: skip
                url = f"{front.url}/v2/models/remote/infer"
                async with http.post(url, json=body, headers={"x-user-id": f"u{i}"}) as r:
                    variant = r.headers["x-rollguard-variant"]
                    statuses[variant][r.status] = statuses[variant].get(r.status, 0) + 1
                    if r.status == 200:
                        doc = await r.json()
                        assert doc["id"] == f"r{i}" and doc["model_version"] == variant
                        assert [o["name"] for o in doc["outputs"]] == ["label", "probabilities"]
                    else:
                        assert r.status == 502, await r.text()
            # Pinned to the stable over REST at the front: the answer the backend gives.
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 30],
                                "data": X[:3].ravel().tolist()}]}  # fmt: skip
            answers = []
            for base, path in ((front.url, "remote/versions/1.0.0"),
                               (back.url, "fraud/versions/1.0.0")):  # fmt: skip
                async with http.post(f"{base}/v2/models/{path}/infer", json=body) as r:
                    assert r.status == 200
                    answers.append((await r.json())["outputs"])
            assert answers[0] == answers[1]

        stable, candidate = windows.get("remote", "1.0.0"), windows.get("remote", "1.2.0")
        assert statuses["1.0.0"] == {200: stable.requests} and stable.errors == 0
        assert candidate.errors == statuses["1.2.0"].get(502, 0) > 0
        assert candidate.requests == sum(statuses["1.2.0"].values())

        # gRPC in front of gRPC: the client's raw message relayed, the upstream's answer back.
        client = triton_aio.InferenceServerClient(front.grpc_target)
        try:
            rows = np.ascontiguousarray(X[:3], dtype=np.float32)
            tensor = triton.InferInput("input", [3, 30], "FP32")
            tensor.set_data_from_numpy(rows)
            result = await client.infer("remote", [tensor], request_id="g1",
                                        model_version="1.0.0")  # fmt: skip
            answer = result.get_response()
            assert answer.model_name == "remote" and answer.model_version == "1.0.0"
            assert answer.id == "g1"
            assert result.as_numpy("label").tolist() == answers[1][0]["data"]
            assert await client.is_model_ready("remote", "1.2.0")
        finally:
            await client.close()


def _loose(registry: Path, target: str, **upstream: object) -> None:
    """registry/loose/1: the backend's fraud 1.0.0, no tensors declared (the upstream
    checks them), followed every 0.1 s."""
    directory = registry / "loose" / "1"
    directory.mkdir(parents=True)
    options = ", ".join(f"{k}: {v}" for k, v in upstream.items())
    (directory / "model.yaml").write_text(
        f"name: loose\nversion: '1'\nframework: grpc\nendpoint: {target}\nstage: production\n"
        f"upstream: {{model: fraud, version: 1.0.0, probe_interval_s: 0.1, {options}}}\n"
    )


async def test_an_upstream_400_passes_through_uncounted_and_a_dead_upstream_goes_unready(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    bad = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 29], "data": [0.0] * 29}]}
    front_registry = tmp_path / "front-registry"
    async with serve(tmp_path / "back", make_registry("fraud/1.0.0")) as back:
        _loose(front_registry, back.grpc_target, unready_after=1)
        async with (
            serve(tmp_path / "front", front_registry) as front,
            aiohttp.ClientSession() as http,
        ):
            window = front.gateway.windows.get("loose", "1")
            async with http.post(f"{front.url}/v2/models/loose/infer", json=bad) as r:
                assert r.status == 400
                said = (await r.json())["error"]
                assert "shape [1, 29] does not match declared [-1, 30]" in said
            client = triton_aio.InferenceServerClient(front.grpc_target)
            try:
                tensor = triton.InferInput("input", [1, 29], "FP32")
                tensor.set_data_from_numpy(np.zeros((1, 29), dtype=np.float32))
                with pytest.raises(triton.InferenceServerException) as refused:
                    await client.infer("loose", [tensor])
                assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
                assert said in str(refused.value.message())
            finally:
                await client.close()
            assert (window.requests, window.errors) == (0, 0)  # the client's fault, no one's

            async with http.get(f"{front.url}/v2/models/loose/versions/1/ready") as r:
                assert r.status == 200
            await back.running.close()  # the upstream goes away
            await eventually(lambda: not front.gateway.registry.get("loose", "1").runner.ready)
            async with http.get(f"{front.url}/v2/models/loose/versions/1/ready") as r:
                assert r.status == 503
            row = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30],
                               "data": X[0].tolist()}]}  # fmt: skip
            async with http.post(f"{front.url}/v2/models/loose/infer", json=row) as r:
                assert r.status in (502, 503), await r.text()


async def test_an_unreachable_grpc_upstream_is_refused_with_its_reason(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    _loose(registry, "grpc://127.0.0.1:9", unready_after=1)
    async with serve(tmp_path, registry) as front, aiohttp.ClientSession() as http:
        async with http.get(f"{front.url}/v2/models/loose/versions/1/ready") as r:
            assert r.status == 503
        reason = front.gateway.registry.refused().get(("loose", "1"), "")
        assert "readiness: UNAVAILABLE" in reason


async def test_a_grpc_client_in_front_of_an_http_upstream(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """gRPC in, REST out: the request goes as the V2 REST body that says the same (binary
    tensors, id), the REST answer comes back as raw contents."""
    async with serve(tmp_path / "back", make_registry("fraud/1.0.0")) as back:
        registry = tmp_path / "front-registry"
        directory = registry / "viahttp" / "1"
        directory.mkdir(parents=True)
        (directory / "model.yaml").write_text(
            "name: viahttp\nversion: '1'\nframework: http\nstage: production\n"
            f"endpoint: {back.url}/v2/models/fraud/versions/1.0.0\n"
            "inputs: [{name: input, datatype: FP32, shape: [-1, 30]}]\n"
        )
        async with serve(tmp_path / "front", registry) as front:
            rows = np.ascontiguousarray(X[:5], dtype=np.float32)
            client = triton_aio.InferenceServerClient(front.grpc_target)
            try:
                tensor = triton.InferInput("input", [5, 30], "FP32")
                tensor.set_data_from_numpy(rows)
                outputs = [triton.InferRequestedOutput("probabilities")]
                result = await client.infer("viahttp", [tensor], outputs=outputs, request_id="h1")
            finally:
                await client.close()
            answer = result.get_response()
            assert (answer.id, answer.model_version) == ("h1", "1")
            assert [o.name for o in answer.outputs] == ["probabilities"]
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [5, 30],
                                "data": rows.ravel().tolist()}],
                    "outputs": [{"name": "probabilities"}]}  # fmt: skip
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{back.url}/v2/models/fraud/versions/1.0.0/infer", json=body) as r,
            ):
                direct = (await r.json())["outputs"][0]["data"]
            np.testing.assert_allclose(result.as_numpy("probabilities").ravel(), direct, rtol=1e-6)


async def test_registry_add_reads_a_grpc_upstreams_tensors(
    tmp_path: Path, make_registry: MakeRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rollguard registry add --framework grpc --endpoint host:port`: no artifact, the
    tensors from the upstream's V2 gRPC ModelMetadata; the version then serves."""
    back_registry = make_registry("fraud/1.0.0")
    async with serve(tmp_path / "back", back_registry) as back:
        root = tmp_path / "front-registry"
        argv = ["registry", "--registry", str(root), "add", "--model", "remote",
                "--version", "1.0.0", "--framework", "grpc", "--endpoint",
                f"grpc://{back.grpc_target}", "--upstream-model", "fraud",
                "--upstream-version", "1.0.0"]  # fmt: skip
        assert await asyncio.to_thread(main, argv) == 0
        manifest = load_manifest(root / "remote" / "1.0.0" / "model.yaml")
        served = load_manifest(back_registry / "fraud" / "1.0.0" / "model.yaml")
        assert manifest.framework == "grpc" and manifest.artifact is None
        assert manifest.upstream is not None and manifest.upstream.model == "fraud"
        assert [t.spec().to_json() for t in manifest.inputs] == [
            t.spec().to_json() for t in served.inputs
        ]
        assert [t.name for t in manifest.outputs] == [t.name for t in served.outputs]
        # A model the upstream does not have: one line naming it, nothing written.
        argv[argv.index("fraud")] = "nope"
        argv[argv.index("1.0.0")] = "2.0.0"
        assert await asyncio.to_thread(main, argv) != 0
        err = capsys.readouterr().err
        assert "'nope'" in err and "NOT_FOUND" in err and len(err.strip().splitlines()) == 1
        assert not (root / "remote" / "2.0.0").exists()
        async with serve(tmp_path / "front", root) as front:  # the added version serves
            body = {"inputs": [{"name": served.inputs[0].name, "datatype": "FP32",
                                "shape": [1, 30], "data": X[0].tolist()}]}  # fmt: skip
            async with aiohttp.ClientSession() as http:
                url = f"{front.url}/v2/models/remote/versions/1.0.0/infer"
                async with http.post(url, json=body) as answer:
                    assert answer.status == 200, await answer.text()
