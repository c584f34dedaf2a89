"""A real `rollguard serve` child with a canary policy, an admin token and (optionally) an audit
key, for the audit and state tests (tests/security, tests/faults) and load_tests/soak_kill.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from rollguard.proxy.process import GatewayProcess

TOKEN = "t" * 32
KEY = "k3y-" * 10  # 40 characters
CANARY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: {name}}}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "{candidate}"
  strategy: canary
  split: hash
  key: header:x-user-id
  steps:
    - {{weight: 20, hold: {hold}, min_requests: 20}}
    - {{weight: 50, hold: {hold}, min_requests: 20}}
    - {{weight: 100, hold: {hold}, min_requests: 20}}
  interval: 0.2s
  checks:
    - {{metric: error_rate, max_increase_vs_stable: 0.05, min_samples: 20, on_fail: rollback}}
    - {{metric: accuracy, max_drop_vs_stable: 0.1, min_samples: 20, on_fail: rollback}}
"""


def write_policy(
    policies: Path, name: str = "fraud", candidate: str = "1.1.0", hold: str = "1h"
) -> None:
    """Write (atomically, as a ConfigMap swap would) one canary policy file."""
    policies.mkdir(parents=True, exist_ok=True)
    tmp = policies / f".{name}.yaml.tmp"
    tmp.write_text(CANARY.format(name=name, candidate=candidate, hold=hold))
    os.replace(tmp, policies / f"{name}.yaml")


def child_env(*, key: str | None = KEY, **settings: str) -> dict[str, str]:
    env = {**os.environ, "ROLLGUARD_ADMIN_TOKEN": TOKEN, "ROLLGUARD_LOG_LEVEL": "WARNING"}
    env.pop("ROLLGUARD_AUDIT_KEY", None)
    if key is not None:
        env["ROLLGUARD_AUDIT_KEY"] = key
    env.update({f"ROLLGUARD_{k.upper()}": v for k, v in settings.items()})
    return env


def start(root: Path, registry: Path, env: dict[str, str]) -> GatewayProcess:
    return GatewayProcess(
        registry=registry,
        policies=root / "policies",
        state=root / "state",
        log=root / "serve.log",
        env=env,
    )


async def ready_or_exit(gateway: GatewayProcess, http: aiohttp.ClientSession) -> int | None:
    """None once the gateway is ready; its exit status if it exits first."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (code := gateway.proc.poll()) is not None:
            return code
        try:
            async with http.get(f"{gateway.url}/v2/health/ready") as r:
                if r.status == 200:
                    return None
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the gateway neither started nor exited; see {gateway.log}")


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def admin_get(gateway: GatewayProcess, http: aiohttp.ClientSession, path: str) -> Any:
    async with http.get(f"{gateway.admin_url}{path}", headers=auth()) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def act(gateway: GatewayProcess, http: aiohttp.ClientSession, name: str, action: str) -> int:
    body = {"actor": "alice", "reason": "test"}
    url = f"{gateway.admin_url}/admin/rollouts/{name}/{action}"
    async with http.post(url, json=body, headers=auth()) as r:
        return r.status


async def wait_rollout(
    gateway: GatewayProcess, http: aiohttp.ClientSession, name: str = "fraud"
) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        overview = await admin_get(gateway, http, "/admin/rollouts")
        for doc in overview["rollouts"]:
            if doc["name"] == name:
                return dict(doc)
        await asyncio.sleep(0.05)
    raise TimeoutError(f"rollout {name} never appeared; see {gateway.log}")


def audit_cli(state: Path, *args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    """`rollguard audit ...` as a user runs it (the key from the environment, if any)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLGUARD_")}
    if key is not None:
        env["ROLLGUARD_AUDIT_KEY"] = key
    command = [sys.executable, "-m", "rollguard.proxy.cli", "audit", "--state", str(state), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def entries(state: Path) -> list[dict[str, Any]]:
    path = state / "audit.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def forge_plain_chain(state: Path, keep: Any) -> None:
    """Rewrite the log as someone without the key can: drop entries `keep(entry)` refuses,
    renumber, and recompute the plain sha256 chain and the head."""
    prev, seq, out = "0" * 64, 0, []
    for entry in entries(state):
        if not keep(entry):
            continue
        seq += 1
        entry.pop("key", None)
        entry.update(seq=seq, prev=prev)
        body = {k: v for k, v in entry.items() if k != "hash"}
        entry["hash"] = prev = hashlib.sha256(_canonical(body)).hexdigest()
        out.append(_canonical(entry) + b"\n")
    (state / "audit.jsonl").write_bytes(b"".join(out))
    (state / "audit.jsonl.head").write_bytes(_canonical({"seq": seq, "hash": prev}) + b"\n")


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
