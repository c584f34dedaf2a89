"""Health bodies as the REST spec defines them, `GET /v2/`, the advertised extensions,
and Triton's statistics extension as tritonclient reads it."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http.aio as triton_aio
import yaml
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from tritonclient.http import InferInput
from tritonclient.utils import InferenceServerException

from rollguard.serving.demo.build import load_eval_data
from tests.proxy.conftest import MakeRegistry
from tests.proxy.mlserver_standin import MLServerStandIn, write_version
from tests.proxy.support import serve, start_upstream

X, Y = load_breast_cancer(return_X_y=True)


@pytest.fixture(scope="module")
def model() -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(X, Y)


@pytest.fixture
async def upstream(model: Pipeline) -> AsyncIterator[tuple[MLServerStandIn, str]]:
    server = MLServerStandIn("bc", {"1": model, "2": model}, failing={"2"})
    runner, base = await start_upstream(server.application())
    try:
        yield server, base
    finally:
        await runner.cleanup()


async def test_health_bodies_server_metadata_and_extensions(
    tmp_path: Path, upstream: tuple[MLServerStandIn, str]
) -> None:
    standin, base = upstream
    registry = tmp_path / "registry"
    write_version(registry, "1", standin.url(base, "1"))
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        for path, body in (
            ("/v2/health/live", {"live": True}),
            ("/v2/health/ready", {"ready": True}),
        ):
            async with http.get(server.url + path) as resp:
                assert resp.status == 200 and await resp.json() == body
        async with http.get(f"{server.url}/v2/") as resp:  # the spec's own path
            assert resp.status == 200
            metadata = await resp.json()
        async with http.get(f"{server.url}/v2") as resp:
            assert await resp.json() == metadata
        assert set(metadata) == {"name", "version", "extensions"}
        # Every advertised extension has its route here.
        assert sorted(metadata["extensions"]) == ["binary_tensor_data", "feedback", "statistics"]
        async with http.get(f"{server.url}/v2/models/bc/stats") as resp:
            assert resp.status == 200
        async with http.post(f"{server.url}/v2/models/bc/feedback", json=[]) as resp:
            assert resp.status == 400  # the route is there; an empty list is refused
        async with http.post(f"{server.url}/v2/repository/index") as resp:
            assert resp.status == 404  # model_repository is not advertised, nor served


def _input(rows: int) -> InferInput:
    tensor = InferInput("input-0", [rows, 30], "FP64")
    tensor.set_data_from_numpy(X[:rows].astype(np.float64), binary_data=True)
    return tensor


async def test_statistics_count_each_versions_own_inferences(
    tmp_path: Path, upstream: tuple[MLServerStandIn, str]
) -> None:
    standin, base = upstream
    registry = tmp_path / "registry"
    write_version(registry, "1", standin.url(base, "1"))
    write_version(registry, "2", standin.url(base, "2"), stage="staging")
    async with serve(tmp_path, registry) as server:
        client = triton_aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            for rows in (1, 3, 3):
                await client.infer("bc", [_input(rows)])
            await client.infer("bc", [_input(2)], model_version="1")  # pinned counts too
            with pytest.raises(InferenceServerException):
                await client.infer("bc", [_input(1)], model_version="2")  # upstream 500
            bad = InferInput("input-0", [1, 29], "FP64")  # bad input: no version's
            bad.set_data_from_numpy(X[:1, :29].astype(np.float64))
            with pytest.raises(InferenceServerException, match="shape"):
                await client.infer("bc", [bad])

            stats = await client.get_inference_statistics("bc")
            by_version = {s["version"]: s for s in stats["model_stats"]}
            assert set(by_version) == {"1", "2"}
            one, two = by_version["1"], by_version["2"]
            assert one["name"] == "bc"
            assert (one["inference_count"], one["execution_count"]) == (9, 4)
            inference = one["inference_stats"]
            assert inference["success"]["count"] == 4 and inference["fail"]["count"] == 0
            assert inference["success"]["ns"] > 0
            for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
                assert inference[phase]["count"] == 4
            assert inference["compute_infer"]["ns"] > 0
            parts = sum(inference[p]["ns"] for p in ("queue", "compute_input", "compute_infer",
                                                      "compute_output"))  # fmt: skip
            assert parts == inference["success"]["ns"]
            assert {b["batch_size"]: b["compute_infer"]["count"] for b in one["batch_stats"]} == {
                1: 1,
                2: 1,
                3: 2,
            }
            assert one["last_inference"] > 1_600_000_000_000  # ms since the epoch
            assert two["inference_stats"]["fail"]["count"] == 1
            assert two["inference_stats"]["success"]["count"] == 0

            pinned = await client.get_inference_statistics("bc", model_version="2")
            assert [s["version"] for s in pinned["model_stats"]] == ["2"]
            everything = await client.get_inference_statistics()
            assert len(everything["model_stats"]) == 2
            with pytest.raises(InferenceServerException) as unknown:
                await client.get_inference_statistics("nope")
            assert unknown.value.status() == "404"
        finally:
            await client.close()


async def test_statistics_queue_is_the_wait_for_a_slot_of_the_version(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """One call at a time in fraud 1.3.0 (a model ~25 ms slow): requests sent together
    wait for its slot, and that wait is the statistics' `queue`, out of `compute_infer`."""
    registry = make_registry("fraud/1.3.0")
    rows = load_eval_data()[0][:1]
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30],
                        "data": rows.ravel().tolist()}]}  # fmt: skip
    url = "/v2/models/fraud/versions/1.3.0"
    async with (
        serve(tmp_path, registry, version_concurrency=1) as server,
        aiohttp.ClientSession() as http,
    ):

        async def infer() -> None:
            async with http.post(f"{server.url}{url}/infer", json=body) as resp:
                assert resp.status == 200, await resp.text()

        async def queued() -> dict[str, Any]:
            await asyncio.gather(*(infer() for _ in range(4)))
            async with http.get(f"{server.url}{url}/stats") as resp:
                stats: dict[str, Any] = (await resp.json())["model_stats"][0]["inference_stats"]
            return stats

        stats = await queued()
        for _ in range(20):  # four at once make three wait, unless the machine is very slow
            if stats["queue"]["ns"] > 0:
                break
            stats = await queued()
        assert stats["queue"]["ns"] > 0 and stats["queue"]["count"] == stats["success"]["count"]
        phases = ("queue", "compute_input", "compute_infer", "compute_output")
        assert sum(stats[p]["ns"] for p in phases) == stats["success"]["ns"]


async def test_statistics_queue_includes_the_wait_for_a_batch(
    tmp_path: Path, demo_registry: Path
) -> None:
    """A version with `batching` holds a lone request up to max_delay_ms for company:
    that wait is its queue too."""
    version = tmp_path / "registry" / "fraud-onnx" / "1.0.0"
    shutil.copytree(demo_registry / "fraud-onnx" / "1.0.0", version)
    manifest = yaml.safe_load((version / "model.yaml").read_text())
    manifest["batching"] = {"max_batch_size": 8, "max_delay_ms": 20}
    (version / "model.yaml").write_text(yaml.safe_dump(manifest))
    row = load_eval_data()[0][0]
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30],
                        "data": row.tolist()}]}  # fmt: skip
    url = "/v2/models/fraud-onnx/versions/1.0.0"
    async with serve(tmp_path, tmp_path / "registry") as server, aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}{url}/infer", json=body) as resp:
            assert resp.status == 200, await resp.text()
        async with http.get(f"{server.url}{url}/stats") as resp:
            stats = (await resp.json())["model_stats"][0]["inference_stats"]
    assert stats["queue"]["count"] == 1 and stats["queue"]["ns"] > 0
