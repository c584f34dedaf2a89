"""Upstream health followed after load: a failing ready probe or failing calls take a
version out of routing, visibly (version ready, metrics, /admin), and back in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tests.proxy.mlserver_standin import MLServerStandIn, write_version
from tests.proxy.support import Server, serve, start_upstream
from tests.serving.support import eventually

X, Y = load_breast_cancer(return_X_y=True)
FAST = (
    "upstream: {binary_tensors: false, probe_interval_s: 0.05, unready_after: 1,\n"
    "           eject_after: 3, eject_base_s: 0.3, eject_max_s: 1}\n"
)
CANARY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: bc}
spec:
  model: bc
  stable: "1"
  candidate: "2"
  strategy: canary
  split: random
  steps:
    - {weight: 50, hold: 1h}
    - {weight: 100}
  interval: 0.1s
"""
BODY = {
    "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 30], "data": X[0].tolist()}]
}


@pytest.fixture
async def standin() -> AsyncIterator[tuple[MLServerStandIn, str]]:
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, Y)
    server = MLServerStandIn("bc", {"1": model, "2": model})
    runner, base = await start_upstream(server.application())
    try:
        yield server, base
    finally:
        await runner.cleanup()


def _registry(tmp_path: Path, upstream: MLServerStandIn, base: str) -> Path:
    registry = tmp_path / "registry"
    for version, stage in (("1", "production"), ("2", "staging")):
        write_version(registry, version, upstream.url(base, version), stage=stage)
        manifest = registry / "bc" / version / "model.yaml"
        text = manifest.read_text().replace("upstream: {binary_tensors: false}\n", FAST)
        manifest.write_text(text)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "bc.yaml").write_text(CANARY)
    return registry


async def _status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        return resp.status


async def _served(server: Server, http: aiohttp.ClientSession, n: int) -> dict[str, int]:
    served: dict[str, int] = {}
    for _ in range(n):
        async with http.post(f"{server.url}/v2/models/bc/infer", json=BODY) as resp:
            assert resp.status == 200
            variant = resp.headers["x-rollguard-variant"]
            served[variant] = served.get(variant, 0) + 1
    return served


async def test_an_unready_candidate_takes_no_traffic_until_its_probe_passes(
    tmp_path: Path, standin: tuple[MLServerStandIn, str]
) -> None:
    upstream, base = standin
    registry = _registry(tmp_path, upstream, base)
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        ready_2 = f"{server.url}/v2/models/bc/versions/2/ready"
        assert await _status(http, ready_2) == 200
        served = await _served(server, http, 40)
        assert served.get("2", 0) > 0  # the canary at 50 %

        upstream.unready.add("2")
        statuses: list[int] = []

        async def unready() -> bool:
            statuses.append(await _status(http, ready_2))
            return statuses[-1] == 503

        await _wait(unready)
        await eventually(lambda: server.rollouts.describe("bc")["variants"]["candidate"]
                         ["availability"] == "unready")  # fmt: skip
        assert await _served(server, http, 40) == {"1": 40}  # its share goes to stable
        async with http.get(f"{server.admin_url}/metrics") as resp:
            text = await resp.text()
        assert 'rollguard_version_available{model="bc",state="unready",version="2"} 0.0' in text
        assert 'rollguard_version_available{model="bc",state="ready",version="1"} 1.0' in text
        assert await _status(http, f"{server.url}/v2/health/ready") == 200  # stable serves

        upstream.unready.discard("2")

        async def ready_again() -> bool:
            return await _status(http, ready_2) == 200

        await _wait(ready_again)
        await eventually(lambda: server.rollouts.describe("bc")["variants"]["candidate"]
                         ["availability"] == "ready")  # fmt: skip
        await eventually(lambda: server.rollouts.describe("bc")["phase"] != "waiting")

        def routed_again() -> bool:  # the shell republishes the split at its next poll
            table = server.gateway.router.table("bc")
            return table is not None and table.failover is None

        await eventually(routed_again)
        served = await _served(server, http, 60)
        assert served.get("2", 0) > 0


async def test_failing_calls_eject_a_version_for_its_back_off(
    tmp_path: Path, standin: tuple[MLServerStandIn, str]
) -> None:
    upstream, base = standin
    registry = _registry(tmp_path, upstream, base)
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        ready_2 = f"{server.url}/v2/models/bc/versions/2/ready"
        upstream.failing.add("2")
        for _ in range(3):  # eject_after: 3 failed calls in a row
            async with http.post(f"{server.url}/v2/models/bc/versions/2/infer", json=BODY) as r:
                assert r.status == 502
        assert await _status(http, ready_2) == 503  # ejected
        assert (await _served(server, http, 30)) == {"1": 30}
        upstream.failing.discard("2")

        async def back() -> bool:
            return await _status(http, ready_2) == 200

        await _wait(back)  # the 0.3 s back-off ends by itself


async def test_an_ejected_stable_leaves_the_gateway_ready(
    tmp_path: Path, standin: tuple[MLServerStandIn, str]
) -> None:
    """One model behind a sidecar: three calls that fail (a client's inputs the upstream
    cannot run, say) eject it, which steers nothing (the primary is called anyway) and
    used to take the whole gateway out of service (found by an adversarial probe)."""
    upstream, base = standin
    registry = _registry(tmp_path, upstream, base)
    (tmp_path / "policies" / "bc.yaml").unlink()  # no rollout: version 1 serves alone
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        upstream.failing.add("1")
        for _ in range(3):  # eject_after: 3 failed calls in a row
            async with http.post(f"{server.url}/v2/models/bc/infer", json=BODY) as r:
                assert r.status == 502
        assert await _status(http, f"{server.url}/v2/models/bc/versions/1/ready") == 503
        assert await _status(http, f"{server.url}/v2/health/ready") == 200
        upstream.failing.discard("1")
        async with http.post(f"{server.url}/v2/models/bc/infer", json=BODY) as r:
            assert r.status == 200  # still called while ejected, and it answers


async def test_an_unready_stable_makes_the_gateway_unready(
    tmp_path: Path, standin: tuple[MLServerStandIn, str]
) -> None:
    upstream, base = standin
    registry = _registry(tmp_path, upstream, base)
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        health = f"{server.url}/v2/health/ready"
        assert await _status(http, health) == 200
        upstream.unready.add("1")

        async def unready() -> bool:
            return await _status(http, health) == 503

        await _wait(unready)


async def _wait(condition: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    """Await an async condition until it holds (a deadline, never a bare sleep)."""
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110 - polling the gateway over HTTP
            await asyncio.sleep(0.02)
