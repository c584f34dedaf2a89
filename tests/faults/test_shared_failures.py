"""An input no version can run is the input's fault: it counts against neither version.

A client found keys that hash to the candidate and sent them requests every version
fails (zero rows to a scikit-learn pipeline; an answer of 500 from every upstream): each
was a 500 or 502 counted as the candidate's error, and a few dozen rolled a healthy
candidate back, or ejected its upstream so that every user's share failed over. The
gateway now asks the rollout's other version once when a routed request fails: when that
one fails too, nobody is charged. A failure only the candidate makes still is.

The real gateway over loopback, the demo's real models and stand-in V2 upstreams.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from rollguard.serving.demo.build import load_eval_data
from tests.faults.support import admin, metric, requests_by_code, until
from tests.fleet.support import upstream
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import Server, serve, start_upstream

X, _ = load_eval_data()
TOKEN = "shared-failures-token-0123456789"
POLICY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: {model}}}
spec:
  model: {model}
  stable: "{stable}"
  candidate: "{candidate}"
  key: header:x-user-id
  interval: 0.1s
  steps:
    - {{weight: 50, hold: 1h}}
    - {{weight: 100}}
  checks:
    - {{metric: error_rate, max: 0.01, min_samples: 5, on_fail: rollback}}
"""
ZERO_ROWS = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 30], "data": []}]}


def _policies(tmp_path: Path, model: str, stable: str, candidate: str) -> Path:
    policies = tmp_path / "policies"
    policies.mkdir()
    text = POLICY.format(model=model, stable=stable, candidate=candidate)
    (policies / f"{model}.yaml").write_text(text)
    return policies


def _row(i: int) -> dict[str, Any]:
    row = X[i % len(X)].tolist()
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": row}]}


async def _post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], user: str
) -> tuple[int, str, str]:
    async with http.post(url, json=body, headers={"x-user-id": user}) as r:
        return r.status, r.headers.get("x-rollguard-variant", ""), await r.text()


async def _variants(server: Server, http: aiohttp.ClientSession, model: str) -> Any:
    return await admin(server, http, f"rollouts/{model}")


async def test_an_input_no_version_can_run_counts_against_neither(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policies = _policies(tmp_path, "fraud", "1.0.0", "1.1.0")
    async with (
        serve(tmp_path, registry, policies=policies, admin_token=TOKEN) as server,
        aiohttp.ClientSession() as http,
    ):
        url = f"{server.url}/v2/models/fraud/infer"
        answered: dict[str, int] = {}
        for i in range(40):  # keys on both arms
            status, variant, text = await _post(http, url, ZERO_ROWS, f"user-{i}")
            assert status == 400, text
            assert "no version of model 'fraud' can run this input" in text, text
            assert "1.0.0 and 1.1.0 both failed on it" in text, text
            answered[variant] = answered.get(variant, 0) + 1
        for i in range(40):  # well-formed requests still answer, and count
            status, _, text = await _post(http, url, _row(i), f"user-{i}")
            assert status == 200, text
        doc = await _variants(server, http, "fraud")
        assert doc["phase"] == "progressing", doc["reason"]
        assert doc["variants"]["stable"]["errors"] == 0
        assert doc["variants"]["candidate"]["errors"] == 0
        shared = await metric(server, http, "rollguard_shared_failures_total")
        assert sum(shared.values()) == 40, shared
        assert set(shared) == {"model=fraud,role=stable", "model=fraud,role=candidate"}, shared
        for version in ("1.0.0", "1.1.0"):
            assert "500" not in await requests_by_code(server, http, "fraud", version)


async def test_a_failure_only_the_candidate_makes_still_counts(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """The demo's faulty candidate (1.2.0) fails ~5 % of rows the stable answers: those
    are its own errors, answered 500, and roll it back."""
    registry = make_registry("fraud/1.0.0", "fraud/1.2.0")
    policies = _policies(tmp_path, "fraud", "1.0.0", "1.2.0")
    async with (
        serve(tmp_path, registry, policies=policies, admin_token=TOKEN) as server,
        aiohttp.ClientSession() as http,
    ):
        url = f"{server.url}/v2/models/fraud/infer"
        failed: list[str] = []
        sent = 0

        async def some_failed() -> bool:
            nonlocal sent
            for _ in range(20):
                status, variant, text = await _post(http, url, _row(sent), f"user-{sent}")
                sent += 1
                assert status in (200, 500), text
                if status == 500:
                    failed.append(variant)
            return len(failed) >= 3

        await until(some_failed, timeout_s=60.0)
        assert set(failed) == {"1.2.0"}
        doc = await _variants(server, http, "fraud")
        assert doc["variants"]["candidate"]["errors"] >= 3
        assert doc["variants"]["stable"]["errors"] == 0
        assert await metric(server, http, "rollguard_shared_failures_total") == {}


MARK = -999.0  # an input value the stand-in upstreams answer 500 to


def _marked(doc: dict[str, Any]) -> bool:
    """An input the stand-in upstreams cannot run, as a server cannot run some inputs."""
    return MARK in doc["inputs"][0]["data"]


def _remote(value: float) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [value, 1.0]}]}


async def _candidate_keys(http: aiohttp.ClientSession, url: str, count: int) -> list[str]:
    """Keys the split sends to the candidate (remote/2), found with good requests."""
    keys: list[str] = []
    for i in range(400):
        status, variant, text = await _post(http, url, _remote(1.0), f"key-{i}")
        assert status == 200, text
        if variant == "2":
            keys.append(f"key-{i}")
            if len(keys) == count:
                return keys
    raise AssertionError(f"only {len(keys)} keys of 400 reached the candidate")


async def test_upstreams_that_both_fail_an_input_are_neither_charged_nor_ejected(
    tmp_path: Path,
) -> None:
    registry = tmp_path / "registry"
    policies = _policies(tmp_path, "remote", "1", "2")
    async with (
        upstream(registry, failing={"1", "2"}, when=_marked),
        serve(tmp_path, registry, policies=policies, admin_token=TOKEN) as server,
        aiohttp.ClientSession() as http,
    ):
        url = f"{server.url}/v2/models/remote/infer"
        keys = await _candidate_keys(http, url, 12)
        for key in keys:  # more than eject_after (5) in a row on the candidate
            status, _, text = await _post(http, url, _remote(MARK), key)
            assert status == 502, text
            assert "2 both failed this request" in text, text
        async with http.get(f"{server.url}/v2/models/remote/versions/2/ready") as r:
            assert r.status == 200  # not ejected
        status, variant, text = await _post(http, url, _remote(1.0), keys[0])
        assert (status, variant) == (200, "2"), text  # the user keeps the candidate
        doc = await _variants(server, http, "remote")
        assert doc["unavailable"] is None and doc["phase"] == "progressing", doc["reason"]
        assert doc["variants"]["candidate"]["errors"] == 0
        assert doc["variants"]["stable"]["errors"] == 0
        shared = await metric(server, http, "rollguard_shared_failures_total")
        assert shared == {"model=remote,role=candidate": 12.0}, shared


async def test_an_upstream_only_the_candidate_fails_is_charged_and_ejected(
    tmp_path: Path,
) -> None:
    registry = tmp_path / "registry"
    policies = _policies(tmp_path, "remote", "1", "2")
    async with (
        upstream(registry, failing={"2"}, when=_marked),
        serve(tmp_path, registry, policies=policies, admin_token=TOKEN) as server,
        aiohttp.ClientSession() as http,
    ):
        url = f"{server.url}/v2/models/remote/infer"
        keys = await _candidate_keys(http, url, 5)
        for key in keys:
            status, _, text = await _post(http, url, _remote(MARK), key)
            assert status == 502 and "both failed" not in text, text
        async with http.get(f"{server.url}/v2/models/remote/versions/2/ready") as r:
            assert r.status == 503  # ejected after 5 failed calls in a row
        doc = await _variants(server, http, "remote")
        assert doc["variants"]["candidate"]["errors"] == 5
        assert await metric(server, http, "rollguard_shared_failures_total") == {}


async def test_a_candidate_whose_inputs_the_stable_refuses_is_still_charged(
    tmp_path: Path,
) -> None:
    """Found in review: the stable refusing the input by its own declared inputs (the
    candidate takes a new feature) counted as the stable failing it too, so a candidate
    failing every request was never charged nor ejected."""

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def infer(request: web.Request) -> web.Response:
        return web.json_response({"error": "boom"}, status=500)  # the candidate: broken

    app = web.Application()
    app.router.add_get("/v2/models/remote/versions/{version}/ready", ready)
    app.router.add_post("/v2/models/remote/versions/{version}/infer", infer)
    runner, base = await start_upstream(app)
    registry = tmp_path / "registry"
    for version, width in (("1", 2), ("2", 3)):  # version 2 takes a new feature
        directory = registry / "remote" / version
        directory.mkdir(parents=True)
        (directory / "model.yaml").write_text(
            f"name: remote\nversion: '{version}'\nframework: http\n"
            f"endpoint: {base}/v2/models/remote/versions/{version}\nstage: production\n"
            f"inputs: [{{name: x, datatype: FP32, shape: [-1, {width}]}}]\n"
        )
    policies = _policies(tmp_path, "remote", "1", "2")
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    try:
        async with (
            serve(tmp_path, registry, policies=policies, admin_token=TOKEN) as server,
            aiohttp.ClientSession() as http,
        ):
            url = f"{server.url}/v2/models/remote/infer"
            charged = 0
            for i in range(200):
                status, variant, text = await _post(http, url, body, f"u{i}")
                if variant == "2":
                    assert status == 502 and "both failed" not in text, text
                    charged += 1
                if charged == 5:
                    break
            doc = await _variants(server, http, "remote")
            assert doc["variants"]["candidate"]["errors"] == 5
            async with http.get(f"{server.url}/v2/models/remote/versions/2/ready") as r:
                assert r.status == 503  # ejected after 5 failed calls in a row
            assert await metric(server, http, "rollguard_shared_failures_total") == {}
    finally:
        await runner.cleanup()


async def test_a_rolled_back_candidate_is_not_asked_for_the_stable(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """Found in review: after a rollback the table still names the candidate; asking it
    would excuse the stable's own failures by a version that takes no traffic."""
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policies = _policies(tmp_path, "fraud", "1.0.0", "1.1.0")
    async with (
        serve(tmp_path, registry, policies=policies, admin_token=TOKEN) as server,
        aiohttp.ClientSession() as http,
    ):
        url = f"{server.admin_url}/admin/rollouts/fraud/rollback"
        async with http.post(url, json={"actor": "ops"}, headers=server.admin_headers) as r:
            assert r.status == 200, await r.text()
        for i in range(5):
            status, variant, text = await _post(
                http, f"{server.url}/v2/models/fraud/infer", ZERO_ROWS, f"user-{i}"
            )
            assert (status, variant) == (500, "1.0.0"), text
        assert await metric(server, http, "rollguard_shared_failures_total") == {}
        assert (await requests_by_code(server, http, "fraud", "1.0.0")).get("500") == 5
