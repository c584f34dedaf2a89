"""State from the log: a lost state file, a torn audit tail, and SIGKILLs at random points.

Each test drives a real `rollguard serve` child (and the real `rollguard audit` CLI).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from rollguard.serving.demo.build import load_eval_data
from tests.proxy.conftest import MakeRegistry
from tests.security.audit_support import (
    act,
    audit_cli,
    child_env,
    entries,
    ready_or_exit,
    start,
    wait_rollout,
    write_policy,
)

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
        finally:
            gateway.stop()
    [repair] = [e for e in entries(state) if e["kind"] == "repair"]
    assert repair["data"]["dropped_bytes"] == len(torn)
    assert repair["data"]["dropped"] == torn.decode()
    done = audit_cli(state, "verify")
    assert done.returncode == 0, done.stderr


def test_sigkill_soak_short(tmp_path: Path, demo_registry: Path) -> None:
    """load_tests/soak_kill.py, 5 cycles: every restart verifies and state agrees with log."""
    output = tmp_path / "soak.md"
    command = [
        sys.executable, "-m", "load_tests.soak_kill", "--cycles", "5", "--seed", "7",
        "--registry", str(demo_registry), "--output", str(output),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    table = output.read_text()
    assert "cycles: 5 of 5; failed checks: 0" in table
    assert table.count("| ok |") >= 5
