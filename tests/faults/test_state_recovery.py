"""State from the log: a lost state file, a torn audit tail, a line edited mid-file, and
SIGKILLs at random points.

Each test drives a real `rollguard serve` child (and the real `rollguard audit` CLI).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rollguard.serving.demo.build import load_eval_data
from tests.proxy.conftest import MakeRegistry
from tests.security.audit_support import (
    act,
    admin_get,
    audit_cli,
    child_env,
    entries,
    ready_or_exit,
    start,
    wait_rollout,
    write_policy,
)
from tests.serving.support import eventually

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]
REPO = Path(__file__).resolve().parents[2]
X, _ = load_eval_data()


@pytest.mark.parametrize("key", ["k3y-" * 10, None], ids=["keyed", "unkeyed"])
async def test_a_lost_state_file_keeps_a_rolled_back_rollout_rolled_back(
    tmp_path: Path, make_registry: MakeRegistry, key: str | None
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    write_policy(tmp_path / "policies")
    env = child_env(key=key)
    state = tmp_path / "state"
    async with aiohttp.ClientSession() as http:
        gateway = start(tmp_path, registry, env)
        try:
            assert await ready_or_exit(gateway, http) is None
            assert (await wait_rollout(gateway, http))["phase"] != "rolled_back"
            assert await act(gateway, http, "fraud", "rollback") == 200
        finally:
            gateway.kill()
        (state / "rollouts" / "fraud.json").unlink()
        gateway = start(tmp_path, registry, env)
        try:
            assert await ready_or_exit(gateway, http) is None
            doc = await wait_rollout(gateway, http)
            assert (doc["phase"], doc["weight"]) == ("rolled_back", 0)
            served = set()
            for i in range(60):
                body = {"features": X[i % len(X)].tolist()}
                url = f"{gateway.url}/predict/fraud"
                async with http.post(url, json=body, headers={"x-user-id": f"u{i}"}) as r:
                    served.add(r.headers.get("x-rollguard-variant"))
            assert "1.1.0" not in served
        finally:
            gateway.stop()
    recovered = [e for e in entries(state) if e["kind"] == "state_recovered"]
    assert len(recovered) == 1 and "state file missing" in recovered[0]["data"]["reason"]
    assert recovered[0]["data"]["state"]["phase"] == "rolled_back"
    assert (state / "rollouts" / "fraud.json").exists()  # rewritten, and agreeing
    done = audit_cli(state, "verify", key=key)
    assert done.returncode == 0, done.stderr


async def test_a_torn_audit_tail_is_repaired_at_start(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    write_policy(tmp_path / "policies")
    state = tmp_path / "state"
    async with aiohttp.ClientSession() as http:
        gateway = start(tmp_path, registry, child_env())
        try:
            assert await ready_or_exit(gateway, http) is None
            await wait_rollout(gateway, http)
        finally:
            gateway.kill()
        torn = b'{"actor":"engine","data":{"action":"rollback","reas'
        with (state / "audit.jsonl").open("ab") as f:  # what a crash mid-append leaves
            f.write(torn)
        assert audit_cli(state, "verify").returncode == 1
        gateway = start(tmp_path, registry, child_env(audit_refuse_broken="true"))
        try:
            assert await ready_or_exit(gateway, http) is None, gateway.log.read_text()
            await wait_rollout(gateway, http)
            # A repaired tail is an intact chain: nothing to alarm anyone about.
            assert (await admin_get(gateway, http, "/admin/audit"))["chain"]["chain_ok"] is True
            async with http.get(f"{gateway.admin_url}/metrics") as r:
                assert "rollguard_audit_chain_ok 1.0" in await r.text()
        finally:
            gateway.stop()
    [repair] = [e for e in entries(state) if e["kind"] == "repair"]
    assert repair["data"]["dropped_bytes"] == len(torn)
    assert repair["data"]["dropped"] == torn.decode()
    done = audit_cli(state, "verify")
    assert done.returncode == 0, done.stderr


async def test_a_line_edited_mid_file_is_noticed_at_start(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """Someone rewrites the rollback entry to hide it: refused with audit_refuse_broken;
    by default the gateway starts, says where the chain broke (log, /admin, metric, a
    `chain_break` entry) and the rollout stays rolled back."""
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    write_policy(tmp_path / "policies")
    state = tmp_path / "state"
    async with aiohttp.ClientSession() as http:
        gateway = start(tmp_path, registry, child_env())
        try:
            assert await ready_or_exit(gateway, http) is None
            await wait_rollout(gateway, http)
            assert await act(gateway, http, "fraud", "rollback") == 200
            write_policy(tmp_path / "policies", hold="2h")  # entries after the rollback
            await eventually(lambda: entries(state)[-1]["kind"] == "policy")
        finally:
            gateway.kill()
    lines = (state / "audit.jsonl").read_bytes().splitlines(keepends=True)
    [n] = [i for i, e in enumerate(entries(state), start=1) if e["kind"] == "admin"]
    assert n < len(lines)  # mid-file, not the tail
    edited = lines[n - 1].replace(b'"rollback"', b'"pause"')
    assert edited != lines[n - 1]
    lines[n - 1] = edited
    (state / "audit.jsonl").write_bytes(b"".join(lines))
    log = tmp_path / "serve.log"
    refused = start(tmp_path, registry, child_env(audit_refuse_broken="true"))
    try:
        async with aiohttp.ClientSession() as http:
            assert await ready_or_exit(refused, http) not in (None, 0)
    finally:
        refused.kill()
    assert f"broken at line {n}" in log.read_text() and "refusing to start" in log.read_text()
    log.write_bytes(b"")
    async with aiohttp.ClientSession() as http:
        gateway = start(tmp_path, registry, child_env())
        try:
            assert await ready_or_exit(gateway, http) is None
            doc = await wait_rollout(gateway, http)
            assert (doc["phase"], doc["weight"]) == ("rolled_back", 0)
            chain: dict[str, Any] = (await admin_get(gateway, http, "/admin/audit"))["chain"]
            assert chain["chain_ok"] is False and f"line {n}" in chain["problem"]
            assert "MAC mismatch" in chain["problem"]
            async with http.get(f"{gateway.admin_url}/metrics") as r:
                assert "rollguard_audit_chain_ok 0.0" in await r.text()
        finally:
            gateway.stop()
    assert f"the audit chain is broken at line {n}" in log.read_text()
    [found] = [e for e in entries(state) if e["kind"] == "chain_break"]
    assert found["data"]["line"] == n
    done = audit_cli(state, "verify")
    assert done.returncode == 1 and f"line {n}" in done.stderr


def test_sigkill_soak_short(tmp_path: Path, demo_registry: Path) -> None:
    """load_tests/soak_kill.py, 3 cycles (the 100-cycle run is in load_tests/results):
    every restart verifies, state agrees with the log, the injected fault is handled."""
    output = tmp_path / "soak.md"
    command = [
        sys.executable, "-m", "load_tests.soak_kill", "--cycles", "3", "--seed", "7",
        "--registry", str(demo_registry), "--output", str(output),
        "--kill-points", "traffic,admin", "--faults", "torn record,lost state",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    table = output.read_text()
    assert "cycles: 3 of 3; failed checks: 0" in table
    assert table.count("| ok |") >= 3


async def _answered_by(gateway: Any, http: aiohttp.ClientSession) -> set[str]:
    """The versions that answered 40 requests with 40 keys."""
    found: set[str] = set()
    for i in range(40):
        body = {"features": X[i].tolist()}
        headers = {"x-user-id": f"user-{i}"}
        async with http.post(f"{gateway.url}/predict/fraud", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            found.add(r.headers["x-rollguard-variant"])
    return found


@pytest.mark.parametrize("outcome", ["progressing", "promoted"])
async def test_a_policy_broken_while_the_gateway_ran_keeps_running_after_a_restart(
    tmp_path: Path, make_registry: MakeRegistry, outcome: str
) -> None:
    """A typo while the gateway runs costs nothing (its last good version keeps running);
    the next start used to drop the rollout: the canary vanished, and a promoted
    candidate's traffic went back to the old version (found by an adversarial probe). The
    last good content is kept in the state directory and resumed; deleting the file
    while no gateway runs forgets it."""
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policies = tmp_path / "policies"
    write_policy(policies)
    env = child_env()
    async with aiohttp.ClientSession() as http:
        gateway = start(tmp_path, registry, env)
        try:
            assert await ready_or_exit(gateway, http) is None
            before = await wait_rollout(gateway, http)
            if outcome == "promoted":
                assert await act(gateway, http, "fraud", "promote") == 200
                before = await wait_rollout(gateway, http)
            assert before["phase"] == outcome
            served = await _answered_by(gateway, http)
            (policies / "fraud.yaml").write_text("spec: [\n")  # broken while it runs
        finally:
            gateway.stop()
        gateway = start(tmp_path, registry, env)
        try:
            assert await ready_or_exit(gateway, http) is None
            after = await wait_rollout(gateway, http)
            keep = ("phase", "weight", "generation", "step", "stable", "candidate")
            assert {k: after[k] for k in keep} == {k: before[k] for k in keep}
            assert await _answered_by(gateway, http) == served
            overview = await admin_get(gateway, http, "/admin/rollouts")
            (rejected,) = overview["rejected"]
            assert rejected["file"].endswith("fraud.yaml")
            assert "its last good version, kept in the state directory, runs" in rejected["error"]
        finally:
            gateway.stop()
        (policies / "fraud.yaml").unlink()
        gateway = start(tmp_path, registry, env)
        try:
            assert await ready_or_exit(gateway, http) is None
            overview = await admin_get(gateway, http, "/admin/rollouts")
            assert overview["rollouts"] == [] and overview["rejected"] == []
        finally:
            gateway.stop()
    assert not (tmp_path / "state" / "policies" / "fraud.yaml").exists()
