"""The audit chain and the state files against someone who can write the state directory.

Each test drives a real `rollguard serve` child and the real `rollguard audit` CLI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import aiohttp
import pytest

from tests.proxy.conftest import MakeRegistry
from tests.security.audit_support import (
    KEY,
    act,
    admin_get,
    audit_cli,
    child_env,
    entries,
    forge_plain_chain,
    ready_or_exit,
    start,
    wait_rollout,
    write_policy,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


async def _rolled_back(root: Path, registry: Path, env: dict[str, str]) -> None:
    """Start, roll the canary back by hand, stop: a state directory with a rollback in it."""
    write_policy(root / "policies")
    async with aiohttp.ClientSession() as http:
        gateway = start(root, registry, env)
        try:
            assert await ready_or_exit(gateway, http) is None, gateway.log.read_text()
            await wait_rollout(gateway, http)
            assert await act(gateway, http, "fraud", "rollback") == 200
        finally:
            gateway.stop()


async def _start_status(root: Path, registry: Path, env: dict[str, str]) -> int | None:
    async with aiohttp.ClientSession() as http:
        gateway = start(root, registry, env)
        try:
            return await ready_or_exit(gateway, http)
        finally:
            gateway.stop()


async def test_a_forged_audit_chain_is_detected_with_a_key(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    state = tmp_path / "state"
    await _rolled_back(tmp_path, registry, child_env())
    done = audit_cli(state, "verify")
    assert done.returncode == 0, done.stderr
    assert "sealed with audit key" in done.stdout
    # Erase the rollback and recompute the chain, as anyone without the key can.
    forge_plain_chain(state, lambda e: e["kind"] != "admin")
    done = audit_cli(state, "verify")
    assert done.returncode == 1 and "no entry of the audit log is sealed" in done.stderr
    # The gateway refuses the forged log at start, whatever audit_refuse_broken says.
    assert await _start_status(tmp_path, registry, child_env()) not in (None, 0)
    assert "no entry of the audit log is sealed" in (tmp_path / "serve.log").read_text()


async def test_verify_without_a_key_says_the_chain_is_unkeyed(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    await _rolled_back(tmp_path, registry, child_env(key=None))
    done = audit_cli(tmp_path / "state", "verify", key=None)
    assert done.returncode == 0, done.stderr
    assert "UNKEYED" in done.stdout and "ROLLGUARD_AUDIT_KEY" in done.stdout


@pytest.mark.parametrize("keyed", [True, False], ids=["with a key", "without a key"])
async def test_a_hand_edited_state_file_is_refused_at_start(
    tmp_path: Path, make_registry: MakeRegistry, keyed: bool
) -> None:
    """rolled_back -> promoted in rollouts/fraud.json must never route to the candidate."""
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    env = child_env(key=KEY if keyed else None)
    await _rolled_back(tmp_path, registry, env)
    path = tmp_path / "state" / "rollouts" / "fraud.json"
    doc = json.loads(path.read_text())
    assert doc["state"]["phase"] == "rolled_back"
    doc["state"]["phase"] = "promoted"
    if not keyed:  # recompute the plain digest too: only the log can tell then
        import hashlib

        body = {k: v for k, v in doc.items() if k != "mac"}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        doc["mac"] = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    path.write_text(json.dumps(doc))
    assert await _start_status(tmp_path, registry, env) not in (None, 0)
    log = (tmp_path / "serve.log").read_text()
    if keyed:
        assert "seal does not verify" in log
    else:
        assert "phase='promoted' but audit entry" in log and "phase='rolled_back'" in log
    # The remedy the message names: remove the file, and it is rebuilt from the log.
    path.unlink()
    async with aiohttp.ClientSession() as http:
        gateway = start(tmp_path, registry, env)
        try:
            assert await ready_or_exit(gateway, http) is None
            doc = await wait_rollout(gateway, http)
            assert (doc["phase"], doc["weight"]) == ("rolled_back", 0)
        finally:
            gateway.stop()


async def test_a_broken_chain_is_reported_or_refused_as_configured(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    state = tmp_path / "state"
    await _rolled_back(tmp_path, registry, child_env())
    lines = (state / "audit.jsonl").read_bytes().splitlines(keepends=True)
    edited = lines[1].replace(b'"engine"', b'"mallory"').replace(b'"policy-watcher"', b'"mallory"')
    assert edited != lines[1]
    (state / "audit.jsonl").write_bytes(b"".join([lines[0], edited, *lines[2:]]))
    env = child_env(audit_refuse_broken="true")
    assert await _start_status(tmp_path, registry, env) not in (None, 0)
    assert "broken at line 2" in (tmp_path / "serve.log").read_text()
    async with aiohttp.ClientSession() as http:  # by default: it starts and says so
        gateway = start(tmp_path, registry, child_env())
        try:
            assert await ready_or_exit(gateway, http) is None
            overview = await admin_get(gateway, http, "/admin/rollouts")
            assert overview["audit"]["chain_ok"] is False
            assert "line 2" in overview["audit"]["problem"]
            audit = await admin_get(gateway, http, "/admin/audit")
            assert audit["chain"]["chain_ok"] is False
            async with http.get(f"{gateway.admin_url}/metrics") as r:
                assert "rollguard_audit_chain_ok 0.0" in await r.text()
        finally:
            gateway.stop()
    assert [e["kind"] for e in entries(state)].count("chain_break") == 1
    done = audit_cli(state, "verify")
    assert done.returncode == 1 and "line 2" in done.stderr


async def test_files_are_0600_and_a_symlinked_log_is_refused(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    state = tmp_path / "state"
    await _rolled_back(tmp_path, registry, child_env())
    private = [state / "audit.jsonl", state / "audit.jsonl.head", state / "rollouts" / "fraud.json"]
    assert {p.name: p.stat().st_mode & 0o777 for p in private} == {p.name: 0o600 for p in private}
    moved = tmp_path / "elsewhere.jsonl"
    os.replace(state / "audit.jsonl", moved)
    (state / "audit.jsonl").symlink_to(moved)
    assert await _start_status(tmp_path, registry, child_env()) not in (None, 0)
    assert "symbolic link" in (tmp_path / "serve.log").read_text()
    done = audit_cli(state, "verify")
    assert done.returncode == 1 and "symbolic link" in done.stderr


async def test_a_key_file_inside_the_state_directory_is_refused(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    write_policy(tmp_path / "policies")
    key_file = tmp_path / "state" / "audit.key"
    key_file.parent.mkdir()
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    env = child_env(key=None, audit_key_file=str(key_file))
    assert await _start_status(tmp_path, registry, env) not in (None, 0)
    assert "inside the state directory" in (tmp_path / "serve.log").read_text()
    outside = tmp_path / "audit.key"
    os.replace(key_file, outside)
    env = child_env(key=None, audit_key_file=str(outside))
    assert await _start_status(tmp_path, registry, env) is None
    done = audit_cli(tmp_path / "state", "verify", "--key-file", str(outside), key=None)
    assert done.returncode == 0 and "sealed with audit key" in done.stdout, done.stderr
