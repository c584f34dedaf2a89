"""Fail over, then decide: a candidate that cannot take traffic costs clients nothing.

The real gateway over loopback, real registry files broken the ways operators break
them (an artifact changed so its sha256 no longer matches, an artifact deleted, a
model.yaml overwritten with garbage, a version that is not there yet), and real
traffic throughout: every request must be answered 200, the candidate's share served
by the stable and counted, and the rollout held, then rolled back, as its policy says.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rollguard.policy.audit import verify
from rollguard.serving.demo.build import load_eval_data
from tests.faults.support import (
    admin,
    artifact_of,
    change_bytes,
    copy_version,
    corrupt_manifest,
    delete_artifact,
    metric,
    until,
)
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import Server, serve
from tests.serving.support import eventually

X, _ = load_eval_data()
TOKEN = "failover-test-token-0123456789"
FAST = {"registry_poll_s": 0.1, "failover_poll_s": 0.05, "admin_token": TOKEN}

POLICY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: fraud}}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "1.1.0"
  key: header:x-user-id
  interval: {interval}
  steps:
{steps}
  checks:
    - {{metric: error_rate, max: 0.5, min_samples: 20, on_fail: rollback}}
{extra}
"""
HELD = "    - {weight: 50, hold: 1h}\n    - {weight: 100}"


def policy(steps: str = HELD, interval: str = "0.1s", **extra: str) -> str:
    lines = "".join(f"  {k}: {v}\n" for k, v in extra.items())
    return POLICY.format(steps=steps, interval=interval, extra=lines)


class Clients:
    """Real requests with random user keys, four at a time, until stopped: every status
    and the version that answered, counted."""

    def __init__(self, server: Server, http: aiohttp.ClientSession) -> None:
        self.server, self.http = server, http
        self.statuses: dict[int, int] = {}
        self.variants: dict[str, int] = {}
        self.errors: list[str] = []
        self._stop = asyncio.Event()

    async def _worker(self, w: int) -> None:
        i = w
        while not self._stop.is_set():
            body = {"features": X[i % len(X)].tolist()}
            headers = {"x-user-id": f"user-{w}-{i}"}
            async with self.http.post(
                f"{self.server.url}/predict/fraud", json=body, headers=headers
            ) as r:
                self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
                variant = r.headers.get("x-rollguard-variant", "?")
                self.variants[variant] = self.variants.get(variant, 0) + 1
                if r.status != 200:
                    self.errors.append(f"{r.status} {await r.text()}")
            i += 4
            await asyncio.sleep(0.002)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Clients]:
        tasks = [asyncio.create_task(self._worker(w)) for w in range(4)]
        try:
            yield self
        finally:
            self._stop.set()
            await asyncio.gather(*tasks)

    def served_by(self, version: str) -> int:
        return self.variants.get(version, 0)


FAULTS = {"sha mismatch": change_bytes, "deleted artifact": delete_artifact}
FAULTS["corrupted model.yaml"] = corrupt_manifest


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_broken_candidate_fails_over_holds_then_rolls_back(
    tmp_path: Path, make_registry: MakeRegistry, demo_registry: Path, fault: str
) -> None:
    registry = make_registry("fraud/1.0.0")
    candidate = copy_version(demo_registry, registry, "1.1.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fraud.yaml").write_text(policy(unavailable_deadline="3s"))
    async with (
        serve(tmp_path, registry, policies=policies, **FAST) as server,
        aiohttp.ClientSession() as http,
    ):
        clients = Clients(server, http)
        async with clients.running():
            await eventually(lambda: clients.served_by("1.1.0") >= 20)
            FAULTS[fault](candidate)

            async def held() -> Any:
                doc = await admin(server, http, "rollouts/fraud")
                return doc if doc["unavailable"] is not None else None

            status = await until(held)
            assert status["phase"] == "progressing" and status["weight"] == 50
            assert status["unavailable"] in ("refused", "stale")
            assert "fails over to stable" in status["reason"]
            served_before, stable = clients.served_by("1.1.0"), clients.served_by("1.0.0")
            await eventually(lambda: clients.served_by("1.0.0") >= stable + 40)

            async def rolled_back() -> bool:
                doc = await admin(server, http, "rollouts/fraud")
                return bool(doc["phase"] == "rolled_back")

            await until(rolled_back)
            unavailable = await metric(server, http, "rollguard_rollout_candidate_unavailable")
        assert clients.errors == [] and set(clients.statuses) == {200}, clients.statuses
        # Once failed over, the candidate answered nothing more.
        assert clients.served_by("1.1.0") == served_before
        failovers = await metric(server, http, "rollguard_failover_requests_total")
        counted = {k: v for k, v in failovers.items() if "version=1.1.0" in k}
        assert counted and sum(counted.values()) > 0, failovers
        assert all(k.split("reason=")[1].split(",")[0] in ("refused", "stale") for k in counted)
        assert unavailable == {"rollout=fraud": 0.0}  # rolled back: nothing fails over now
        entries = (await admin(server, http, "audit?rollout=fraud"))["entries"]
        actions = [e["data"].get("action") for e in entries if e["kind"] == "decision"]
        assert actions[-2:] == ["failover", "rollback"], actions
        assert "unavailable_deadline 3s" in entries[-1]["data"]["reason"]
    assert verify(tmp_path / "state" / "audit.jsonl").ok


@pytest.mark.slow
async def test_the_request_path_fails_over_before_the_table_knows(
    tmp_path: Path, make_registry: MakeRegistry, demo_registry: Path
) -> None:
    """With the shell's look far away, only the per-request guard stands between a
    refusal and the clients: it alone must keep them whole."""
    registry = make_registry("fraud/1.0.0")
    candidate = copy_version(demo_registry, registry, "1.1.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fraud.yaml").write_text(policy(interval="1h"))  # no tick looks either
    settings = FAST | {"failover_poll_s": 3600.0}
    async with (
        serve(tmp_path, registry, policies=policies, **settings) as server,
        aiohttp.ClientSession() as http,
    ):
        clients = Clients(server, http)
        async with clients.running():
            await eventually(lambda: clients.served_by("1.1.0") >= 20)
            delete_artifact(candidate)

            async def counted() -> dict[str, float]:
                found = await metric(server, http, "rollguard_failover_requests_total")
                return {k: v for k, v in found.items() if v >= 20}

            found = await until(counted)
            table = server.gateway.router.table("fraud")
            assert table is not None and table.failover is None  # the table never knew
        assert clients.errors == [] and set(clients.statuses) == {200}, clients.statuses
        # its last load is still in memory, its files are refused: stale, failed over
        assert list(found) == ["model=fraud,reason=stale,version=1.1.0"]


@pytest.mark.slow
async def test_a_policy_naming_a_missing_version_waits_then_begins(
    tmp_path: Path, make_registry: MakeRegistry, demo_registry: Path
) -> None:
    registry = make_registry("fraud/1.0.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    steps = "    - {weight: 50, hold: 1h}\n    - {weight: 100}"
    (policies / "fraud.yaml").write_text(policy(steps))
    async with (
        serve(tmp_path, registry, policies=policies, **FAST) as server,
        aiohttp.ClientSession() as http,
    ):
        clients = Clients(server, http)
        async with clients.running():
            await eventually(lambda: clients.served_by("1.0.0") >= 100)
            status = await admin(server, http, "rollouts/fraud")
            assert (status["phase"], status["weight"]) == ("waiting", 0)
            assert status["unavailable"] == "missing"
            assert "waiting for candidate 1.1.0: missing" in status["reason"]
            overview = await admin(server, http, "rollouts")
            assert [r["phase"] for r in overview["rollouts"]] == ["waiting"]
            phases = await metric(server, http, "rollguard_rollout_phase")
            assert phases["phase=waiting,rollout=fraud"] == 1
            assert clients.served_by("1.1.0") == 0
            copy_version(demo_registry, registry, "1.1.0")

            async def began() -> bool:
                doc = await admin(server, http, "rollouts/fraud")
                return bool(doc["phase"] == "progressing")

            await until(began)
            await eventually(lambda: clients.served_by("1.1.0") >= 20)
        assert clients.errors == [] and set(clients.statuses) == {200}, clients.statuses
        status = await admin(server, http, "rollouts/fraud")
        assert (status["weight"], status["unavailable"]) == (50, None)
        entries = (await admin(server, http, "audit?rollout=fraud"))["entries"]
        kinds = [(e["kind"], e["data"].get("action")) for e in entries]
        assert ("decision", "begin") in kinds
        start = next(e for e in entries if e["kind"] == "start")
        assert start["data"]["state"]["phase"] == "waiting"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("on_deadline", "phase", "weight"),
    [("hold", "inconclusive", 50), ("rollback", "rolled_back", 0)],
)
async def test_a_step_deadline_ends_the_rollout_inconclusive(
    tmp_path: Path, make_registry: MakeRegistry, on_deadline: str, phase: str, weight: float
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    steps = "    - {weight: 50, hold: 0s, min_requests: 1000000, deadline: 1s}\n    - {weight: 100}"
    (policies / "fraud.yaml").write_text(policy(steps, on_deadline=on_deadline))
    async with (
        serve(tmp_path, registry, policies=policies, **FAST) as server,
        aiohttp.ClientSession() as http,
    ):
        clients = Clients(server, http)
        async with clients.running():

            async def ended() -> Any:
                doc = await admin(server, http, "rollouts/fraud")
                return doc if doc["inconclusive"] is not None else None

            status = await until(ended)
            mark, stable = clients.served_by("1.1.0"), clients.served_by("1.0.0")
            await eventually(lambda: clients.served_by("1.0.0") >= stable + 50)
        assert (status["phase"], status["weight"]) == (phase, weight)
        assert status["inconclusive"] == "step 1 deadline 1s"
        assert f"on_deadline: {on_deadline}" in status["reason"]
        assert (clients.served_by("1.1.0") > mark) is (weight > 0)  # held: still served
        assert clients.errors == []
        gauge = await metric(server, http, "rollguard_rollout_inconclusive")
        assert gauge == {"rollout=fraud": 1.0}
        decisions = await metric(server, http, "rollguard_rollout_decisions_total")
        assert decisions["action=inconclusive,rollout=fraud"] == 1
        entries = (await admin(server, http, "audit?rollout=fraud"))["entries"]
        last = [e for e in entries if e["kind"] == "decision"][-1]
        assert last["data"]["action"] == "inconclusive"
        assert last["data"]["state"]["phase"] == phase


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["bad bytes", "deleted artifact"])
async def test_a_stable_whose_files_turn_bad_keeps_serving_its_last_verified_load(
    tmp_path: Path, demo_registry: Path, fault: str
) -> None:
    """The stable's artifact is overwritten with garbage (sha256 no longer matches) or
    deleted mid-rollout: it is refused and logged, its last verified load keeps serving,
    and no client sees an error."""
    registry = tmp_path / "registry"
    (registry / "fraud").mkdir(parents=True)
    stable = copy_version(demo_registry, registry, "1.0.0")
    copy_version(demo_registry, registry, "1.1.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fraud.yaml").write_text(policy())
    async with (
        serve(tmp_path, registry, policies=policies, **FAST) as server,
        aiohttp.ClientSession() as http,
    ):
        clients = Clients(server, http)
        async with clients.running():
            await eventually(lambda: clients.served_by("1.0.0") >= 20)
            if fault == "bad bytes":
                artifact_of(stable).write_bytes(b"\x80\x04 not the reviewed model" * 64)
            else:
                delete_artifact(stable)
            registry_state = server.running.registry
            await eventually(lambda: registry_state.availability("fraud", "1.0.0").value == "stale")
            before = clients.served_by("1.0.0")
            await eventually(lambda: clients.served_by("1.0.0") >= before + 40)
        assert clients.errors == [] and set(clients.statuses) == {200}, clients.statuses
        status = await admin(server, http, "rollouts/fraud")
        assert status["phase"] not in ("rolled_back", "promoted"), status


@pytest.mark.parametrize("stable", ["missing", "refused"])
async def test_a_stable_that_cannot_serve_leaves_the_model_to_its_default_version(
    tmp_path: Path, make_registry: MakeRegistry, demo_registry: Path, stable: str
) -> None:
    """A policy whose stable is not in the registry, or refused: its share of the split
    was 404 or 503 (found by an adversarial probe: 87 requests in 100). It is answered by
    the model's default version, as if the model had no rollout, and counted."""
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    name = "9.9.9"
    if stable == "refused":
        name = "1.2.0"
        change_bytes(copy_version(demo_registry, registry, name))
    policies = tmp_path / "policies"
    policies.mkdir()
    text = policy().replace('stable: "1.0.0"', f'stable: "{name}"')
    (policies / "fraud.yaml").write_text(text)
    async with (
        serve(tmp_path, registry, policies=policies, **FAST) as server,
        aiohttp.ClientSession() as http,
    ):
        clients = Clients(server, http)
        async with clients.running():
            await eventually(lambda: clients.served_by("1.0.0") >= 20)
            await eventually(lambda: clients.served_by("1.1.0") >= 20)
        assert clients.errors == [] and set(clients.statuses) == {200}, clients.statuses
        assert set(clients.variants) == {"1.0.0", "1.1.0"}
        failovers = await metric(server, http, "rollguard_failover_requests_total")
        reason = "missing" if stable == "missing" else "refused"
        key = f"model=fraud,reason=stable_{reason},version={name}"
        assert failovers.get(key, 0) >= 20, failovers
