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
from tests.proxy.support import serve
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


async def test_held_copies_are_each_compared_with_their_own_primary(
    tmp_path: Path, make_registry: MakeRegistry, demo_registry: Path
) -> None:
    """1.0.1 is 1.0.0's very model under another version: every copy must agree with its
    primary. Requests of 1 to 3 rows, 16 at a time, once the shadow runs inline (its
    copies then held and answered in shared calls): all copies compared, all agree, each
    row counted once, and each copy's latency recorded."""
    registry = make_registry("fraud-onnx/1.0.0")
    twin = registry / "fraud-onnx" / "1.0.1"
    shutil.copytree(demo_registry / "fraud-onnx" / "1.0.0", twin)
    manifest = twin / "model.yaml"
    manifest.write_text(manifest.read_text().replace("version: 1.0.0", "version: 1.0.1"))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "twin.yaml").write_text(SHADOW)
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
    registry = make_registry("fraud-onnx/1.0.0")
    twin = registry / "fraud-onnx" / "1.0.1"
    shutil.copytree(demo_registry / "fraud-onnx" / "1.0.0", twin)
    manifest = twin / "model.yaml"
    manifest.write_text(manifest.read_text().replace("version: 1.0.0", "version: 1.0.1"))
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "twin.yaml").write_text(SHADOW)
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
