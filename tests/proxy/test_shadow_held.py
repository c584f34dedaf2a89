"""Shadow copies of a cheap in-process model, held and answered together through the real
gateway: every copy is compared with its own primary's answer, none with another's."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiohttp
import orjson

from rollguard.serving.demo import load_eval_data
from rollguard.serving.scheduling import Scheduled
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import serve, start_upstream, write_remote_version
from tests.serving.support import eventually

SHADOW = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: twin}
spec:
  model: fraud-onnx
  stable: "1.0.0"
  candidate: "1.0.1"
  strategy: shadow
  interval: 0.2s
  checks:
    - {metric: agreement, min: 0.99, min_samples: 1000000, on_fail: alert}
"""


def _scheduled(runner: object) -> Scheduled:
    while not isinstance(runner, Scheduled):
        runner = runner.inner  # type: ignore[attr-defined]
    return runner


def _twin(tmp_path: Path, make_registry: MakeRegistry, demo: Path) -> tuple[Path, Path]:
    """A registry of fraud-onnx 1.0.0 and 1.0.1, its very model under another version, and
    a policies directory shadowing 1.0.0 with 1.0.1."""
    registry = make_registry("fraud-onnx/1.0.0")
    twin = registry / "fraud-onnx" / "1.0.1"
    shutil.copytree(demo / "fraud-onnx" / "1.0.0", twin)
    manifest = twin / "model.yaml"
    manifest.write_text(manifest.read_text().replace("version: 1.0.0", "version: 1.0.1"))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "twin.yaml").write_text(SHADOW)
    return registry, policies


async def test_held_copies_are_each_compared_with_their_own_primary(
    tmp_path: Path, make_registry: MakeRegistry, demo_registry: Path
) -> None:
    """1.0.1 is 1.0.0's very model under another version: every copy must agree with its
    primary. Requests of 1 to 3 rows, 16 at a time, once the shadow runs inline (its
    copies then held and answered in shared calls): all copies compared, all agree, each
    row counted once, and each copy's latency recorded."""
    registry, policies = _twin(tmp_path, make_registry, demo_registry)
    x, _ = load_eval_data()
    sizes = [1 + i % 3 for i in range(240)]
    async with (
        # About holding copies, not shedding them: a busy test machine must not shed.
        serve(tmp_path, registry, policies=policies, shadow_budget=1.0) as server,
        aiohttp.ClientSession() as http,
    ):
        await eventually(lambda: server.gateway.router.table("fraud-onnx") is not None)
        url = f"{server.url}/v2/models/fraud-onnx/infer"

        async def send(i: int) -> None:
            start = (i * 7) % (len(x) - 3)
            rows = x[start : start + sizes[i]]
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape),
                                "data": rows.ravel().tolist()}]}  # fmt: skip
            async with http.post(url, data=orjson.dumps(body)) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["x-rollguard-variant"] == "1.0.0"

        shadow = _scheduled(server.gateway.registry.get("fraud-onnx", "1.0.1").runner)
        sent = 0
        while not shadow.batches_now:  # its first calls are measured on its threads
            await send(sent)
            sent += 1
            assert sent < len(sizes) // 2, "the shadow never went inline"
        for first in range(sent, len(sizes), 16):
            await asyncio.gather(*(send(i) for i in range(first, min(first + 16, len(sizes)))))
        await server.gateway.shadow.drain()
        evidence = server.gateway.windows.get("fraud-onnx", "1.0.1").evidence()
        assert evidence.requests == len(sizes) and evidence.errors == 0  # each copy recorded
        assert evidence.compared == sum(sizes)  # every row of every copy, once
        assert evidence.agreed == evidence.compared
        assert server.gateway.shadow.mirrored_share("fraud-onnx", "1.0.1") == 1.0
        assert shadow.batches_now  # still inline: the held copies went the shared way


async def test_copies_held_while_their_version_is_unloaded_are_not_its_failures(
    tmp_path: Path, make_registry: MakeRegistry, demo_registry: Path
) -> None:
    """A reload unloads the shadow's old load while copies wait to be answered: they find
    no model, and are counted `unavailable`, never as errors in the version's window."""
    registry, policies = _twin(tmp_path, make_registry, demo_registry)
    x, _ = load_eval_data()
    body = orjson.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30],
                     "data": x[0].tolist()}]}
    )  # fmt: skip
    async with (
        serve(tmp_path, registry, policies=policies, shadow_budget=1.0) as server,
        aiohttp.ClientSession() as http,
    ):
        await eventually(lambda: server.gateway.router.table("fraud-onnx") is not None)
        url = f"{server.url}/v2/models/fraud-onnx/infer"
        loaded = server.gateway.registry.get("fraud-onnx", "1.0.1")
        shadow = _scheduled(loaded.runner)
        while not shadow.batches_now:
            async with http.post(url, data=body) as resp:
                assert resp.status == 200
        mirror = server.gateway.shadow
        await mirror.drain()
        before = server.gateway.windows.get("fraud-onnx", "1.0.1").evidence()
        mirror.HOLD_S = 3600.0  # held until HOLD_COPIES are
        for _ in range(mirror.HOLD_COPIES - 1):
            async with http.post(url, data=body) as resp:
                assert resp.status == 200
        assert mirror.pending == mirror.HOLD_COPIES - 1
        await loaded.runner.unload()  # what a reload does to the load it replaced
        async with http.post(url, data=body) as resp:
            assert resp.status == 200  # the stable answers; the last copy releases them all
        await eventually(lambda: mirror.pending == 0)
        after = server.gateway.windows.get("fraud-onnx", "1.0.1").evidence()
        assert (after.requests, after.errors) == (before.requests, before.errors)
        async with http.get(f"{server.admin_url}/metrics") as resp:
            text = await resp.text()
        unavailable = (
            'rollguard_shadow_requests_total{model="fraud-onnx",result="unavailable",'
            f'version="1.0.1"}} {float(mirror.HOLD_COPIES)}'
        )
        assert unavailable in text


async def test_copies_in_flight_when_their_version_is_unloaded_are_not_its_failures(
    tmp_path: Path,
) -> None:
    """A remote shadow's copies are mid-call (its upstream is slow) when a reload unloads
    the load they run on: its connection pool closes under them, and they count as
    `unavailable`, never as errors or timeouts in the version's window."""
    from aiohttp import web

    arrived: list[bytes] = []
    release = asyncio.Event()

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def answer(request: web.Request) -> web.Response:
        if request.path.startswith("/slow/"):
            arrived.append(await request.read())
            await release.wait()  # the shadow's upstream, slow to answer
        label = {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]}
        return web.json_response({"model_name": "m", "outputs": [label]})

    app = web.Application()
    for prefix in ("fast", "slow"):
        app.router.add_get(f"/{prefix}/v2/models/m/ready", ready)
        app.router.add_post(f"/{prefix}/v2/models/m/infer", answer)
    upstream, base = await start_upstream(app)
    write_remote_version(tmp_path / "registry", "1", f"{base}/fast/v2/models/m")
    write_remote_version(tmp_path / "registry", "2", f"{base}/slow/v2/models/m")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "remote.yaml").write_text(
        "apiVersion: rollguard/v1\nkind: Rollout\nmetadata: {name: remote}\n"
        "spec: {model: remote, stable: '1', candidate: '2', strategy: shadow, interval: 0.2s}\n"
    )
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}
    )
    try:
        async with (
            serve(tmp_path, tmp_path / "registry", policies=policies, shadow_budget=1.0) as server,
            aiohttp.ClientSession() as http,
        ):
            await eventually(lambda: server.gateway.router.table("remote") is not None)
            for _ in range(3):
                async with http.post(f"{server.url}/v2/models/remote/infer", data=body) as resp:
                    assert resp.status == 200
            await eventually(lambda: len(arrived) == 3)  # every copy is mid-call
            await server.gateway.registry.get("remote", "2").runner.unload()
            await eventually(lambda: server.gateway.shadow.pending == 0)
            evidence = server.gateway.windows.get("remote", "2").evidence()
            assert (evidence.requests, evidence.errors) == (0, 0)
            async with http.get(f"{server.admin_url}/metrics") as resp:
                text = await resp.text()
            assert (
                'rollguard_shadow_requests_total{model="remote",result="unavailable",'
                'version="2"} 3.0'
            ) in text
    finally:
        release.set()
        await upstream.cleanup()
