"""End-to-end rollouts over loopback: automatic rollback, promotion, bad edits, restarts."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from rollguard.policy.audit import verify
from rollguard.proxy.process import GatewayProcess, free_port
from rollguard.serving.demo.build import load_eval_data
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import Server, serve

X, Y = load_eval_data()

CANARY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: fraud}}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "{candidate}"
  strategy: canary
  split: hash
  key: header:x-user-id
  steps:
    - {{weight: 20, hold: 0.3s, min_requests: 60}}
    - {{weight: 50, hold: 0.3s, min_requests: 60}}
    - {{weight: 100, hold: 0.3s, min_requests: 60}}
  interval: 0.2s
  checks:
    - {{metric: error_rate, max_increase_vs_stable: 0.01, min_samples: 60, on_fail: rollback}}
    - {{metric: accuracy, max_drop_vs_stable: 0.1, min_samples: 30, on_fail: rollback}}
"""


async def drive(
    server: Server,
    http: aiohttp.ClientSession,
    until: Callable[[], bool],
    *,
    deadline_s: float = 60.0,
    concurrency: int = 8,
) -> dict[str, int]:
    """Send real rows with random user keys, and their true labels, until `until()`."""
    served: dict[str, int] = {}
    stop = time.monotonic() + deadline_s
    rng = np.random.default_rng(0)

    async def worker(w: int) -> None:
        i = w
        while not until() and time.monotonic() < stop:
            row = i % len(X)
            body = {"features": X[row].tolist(), "id": f"w{w}-{i}"}
            headers = {"x-user-id": f"user-{rng.integers(1_000_000)}"}
            async with http.post(f"{server.url}/predict/fraud", json=body, headers=headers) as r:
                variant = r.headers.get("x-rollguard-variant", "?")
                served[variant] = served.get(variant, 0) + 1
                if r.status == 200:
                    label = {"id": body["id"], "label": int(Y[row])}
                    async with http.post(f"{server.url}/v2/models/fraud/feedback", json=label):
                        pass
            i += concurrency

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    assert until(), f"condition not reached within {deadline_s}s; served {served}"
    return served


def _phase(server: Server, name: str = "fraud") -> str:
    return str(server.rollouts.describe(name)["phase"])


async def test_faulty_candidate_is_rolled_back(tmp_path: Path, make_registry: MakeRegistry) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.2.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fraud.yaml").write_text(CANARY.format(candidate="1.2.0"))
    async with (
        serve(tmp_path, registry, policies=policies) as server,
        aiohttp.ClientSession() as http,
    ):
        served = await drive(server, http, lambda: _phase(server) == "rolled_back")
        assert served.get("1.2.0", 0) > 0
        table = server.gateway.router.table("fraud")
        assert table is not None and table.weight == 0
        # Every request after the rollback goes to stable.
        async with http.post(
            f"{server.url}/predict/fraud",
            json={"features": X[0].tolist()},
            headers={"x-user-id": "anyone"},
        ) as r:
            assert r.headers["x-rollguard-variant"] == "1.0.0"
        entries = server.rollouts.audit_entries(since=None, until=None, rollout="fraud")
        rollback = [e for e in entries if e["data"].get("action") == "rollback"]
        assert rollback and "error_rate" in rollback[0]["data"]["reason"]
    assert verify(tmp_path / "state" / "audit.jsonl").ok


async def test_good_candidate_walks_every_step_and_is_promoted(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fraud.yaml").write_text(CANARY.format(candidate="1.1.0"))
    async with (
        serve(tmp_path, registry, policies=policies) as server,
        aiohttp.ClientSession() as http,
    ):
        await drive(server, http, lambda: _phase(server) == "promoted", deadline_s=90)
        entries = server.rollouts.audit_entries(since=None, until=None, rollout="fraud")
        actions = [e["data"].get("action") for e in entries if e["kind"] == "decision"]
        assert actions.count("advance") == 2 and actions[-1] == "promote"
        async with http.post(
            f"{server.url}/predict/fraud",
            json={"features": X[0].tolist()},
            headers={"x-user-id": "anyone"},
        ) as r:
            assert r.headers["x-rollguard-variant"] == "1.1.0"


async def test_bad_edit_is_rejected_and_the_old_policy_keeps_running(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    path = policies / "fraud.yaml"
    path.write_text(CANARY.format(candidate="1.1.0").replace("interval: 0.2s", "interval: 60s"))
    async with (
        serve(tmp_path, registry, policies=policies, policy_poll_s=0.05) as server,
        aiohttp.ClientSession() as http,
    ):
        before = server.gateway.router.table("fraud")
        assert before is not None and before.weight == 20
        path.write_text(path.read_text().replace("weight: 50", "weight: fifty"))
        deadline = time.monotonic() + 10
        while not server.rollouts.rejected and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        async with http.get(f"{server.admin_url}/admin/rollouts") as r:
            overview = await r.json()
        [rejected] = overview["rejected"]
        assert "fraud.yaml:" in rejected["error"] and "weight" in rejected["error"]
        line = int(rejected["error"].split("fraud.yaml:")[1].split(":")[0])
        assert "fifty" in path.read_text().splitlines()[line - 1]
        assert overview["rollouts"][0]["weight"] == 20
        variants = set()
        for i in range(200):
            async with http.post(
                f"{server.url}/predict/fraud",
                json={"features": X[i % len(X)].tolist()},
                headers={"x-user-id": f"u{i}"},
            ) as r:
                assert r.status == 200
                variants.add(r.headers["x-rollguard-variant"])
        assert variants == {"1.0.0", "1.1.0"}
        async with http.get(f"{server.admin_url}/metrics") as r:
            assert f'rollguard_policy_invalid{{file="{path}"}} 1.0' in await r.text()


def _start(
    registry: Path, policies: Path, state: Path, port: int, admin_port: int
) -> GatewayProcess:
    env = {**os.environ, "ROLLGUARD_LOG_LEVEL": "WARNING"}
    env |= {"ROLLGUARD_ADMIN_AUTH": "none", "ROLLGUARD_ADMIN_TOKEN": ""}  # loopback test
    return GatewayProcess(
        registry=registry, policies=policies, state=state,
        log=state.parent / "serve.log", port=port, admin_port=admin_port, env=env,
    )  # fmt: skip


@pytest.mark.slow
# An unclosed pipe reader surfaces intermittently while gateway child processes run; it
# was not traced to our code (children started with DEVNULL alone do not show it).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_sigkill_mid_rollout_resumes_from_persisted_state(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policies, state = tmp_path / "policies", tmp_path / "state"
    policies.mkdir()
    # Long holds: the rollout stops at step 2 of 3 while we kill it.
    (policies / "fraud.yaml").write_text(
        CANARY.format(candidate="1.1.0").replace(
            "hold: 0.3s, min_requests: 60}}\n    - {weight: 100",
            "hold: 1h, min_requests: 60}\n    - {weight: 100",
        )
    )
    port, admin_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    admin = f"http://127.0.0.1:{admin_port}"
    async with aiohttp.ClientSession() as http:
        gateway = _start(registry, policies, state, port, admin_port)
        try:
            await gateway.wait_ready(http)

            async def step() -> int:
                async with http.get(f"{admin}/admin/rollouts/fraud") as r:
                    return int((await r.json())["step"])

            i = 0
            while await step() < 1 and i < 20_000:
                body = {"features": X[i % len(X)].tolist(), "id": f"r{i}"}
                headers = {"x-user-id": f"u{i}"}
                async with http.post(f"{url}/predict/fraud", json=body, headers=headers) as r:
                    assert r.status == 200
                label = {"id": f"r{i}", "label": int(Y[i % len(Y)])}
                async with http.post(f"{url}/v2/models/fraud/feedback", json=label):
                    pass
                i += 1
            assert await step() == 1
        finally:
            gateway.kill()
        gateway = _start(registry, policies, state, port, admin_port)
        try:
            await gateway.wait_ready(http)
            async with http.get(f"{admin}/admin/rollouts/fraud") as r:
                doc = await r.json()
            assert (doc["step"], doc["phase"], doc["weight"]) == (1, "progressing", 50)
            # An operator rollback survives the next restart too.
            actor = {"actor": "alice"}
            async with http.post(f"{admin}/admin/rollouts/fraud/rollback", json=actor) as r:
                assert r.status == 200
        finally:
            gateway.kill()
        gateway = _start(registry, policies, state, port, admin_port)
        try:
            await gateway.wait_ready(http)
            async with http.get(f"{admin}/admin/rollouts/fraud") as r:
                doc = await r.json()
            assert (doc["phase"], doc["weight"]) == ("rolled_back", 0)
        finally:
            gateway.stop()
    result = verify(state / "audit.jsonl")
    assert result.ok, result.reason
    gc.collect()  # let the stray reader (see the filter above) go inside this test


SHADOW = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: fraud}}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "1.4.0"
  strategy: shadow
  interval: 0.2s
  checks:
    - {{metric: agreement, min: 0.99, min_samples: 50, on_fail: rollback}}
    - {{metric: drift, threshold: 0.25, on_fail: alert}}
  notify: [{{webhook: "{hook}", timeout: 2s, retries: 1}}]
"""


async def test_shadow_mirrors_compares_and_notifies(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """1.4.0 is a less accurate model: mirrored copies disagree with the primary, the
    agreement check rolls the shadow back, and the webhook hears every decision."""
    from aiohttp import web

    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    hook_url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    registry = make_registry("fraud/1.0.0", "fraud/1.4.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fraud.yaml").write_text(SHADOW.format(hook=hook_url))
    try:
        async with (
            # About mirroring, not shedding: a busy test machine must not shed copies.
            serve(
                tmp_path,
                registry,
                policies=policies,
                shadow_budget=1.0,
                webhook_allowed_hosts=("127.0.0.1",),  # the receiver; admin stays refused
            ) as server,
            aiohttp.ClientSession() as http,
        ):
            served = await drive(server, http, lambda: _phase(server) == "rolled_back")
            assert set(served) == {"1.0.0"}  # the shadow never answers a client
            candidate = server.gateway.windows.get("fraud", "1.4.0").evidence()
            assert candidate.compared > 0 and candidate.agreed < candidate.compared
            assert candidate.inputs is not None and candidate.inputs.shape[1] == 30
            deadline = time.monotonic() + 10
            while len(received) < 2 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            kinds = [(r["kind"], r["data"].get("action")) for r in received]
            assert ("start", None) in kinds and ("decision", "rollback") in kinds
            async with http.get(f"{server.admin_url}/metrics") as r:
                text = await r.text()
            assert (
                'rollguard_shadow_requests_total{model="fraud",result="ok",version="1.4.0"}' in text
            )
            assert 'rollguard_shadow_agreement_ratio{model="fraud",version="1.4.0"}' in text
    finally:
        await runner.cleanup()
