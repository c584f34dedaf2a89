"""Debian's real `prometheus` scrapes a running gateway's admin port over loopback, with
the admin token as its bearer credentials, and evaluates config/prometheus/'s rules
against what it scraped; a scrape job with the wrong token is refused."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import serve
from tests.serving.support import eventually

RULES = Path(__file__).resolve().parents[2] / "config" / "prometheus" / "rollguard-rules.yml"
PROMETHEUS = shutil.which("prometheus")
TOKEN = "prometheus-scrape-token-0123456789"
POLICY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: fraud}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "1.1.0"
  key: header:x-user-id
  interval: 1h
  steps: [{weight: 25}, {weight: 100}]
  checks: [{metric: error_rate, max: 0.01, on_fail: rollback}]
"""
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus not found: apt-get install prometheus (.ci/run installs it)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, config: dict[str, Any]) -> AsyncIterator[str]:
    """Run prometheus on a loopback port with `config`; yield its URL; stop it."""
    assert PROMETHEUS is not None
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        PROMETHEUS,
        f"--config.file={path}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


async def _until(check: Any, timeout_s: float = 25.0) -> Any:
    """Call the async `check` until it returns something truthy; that, or TimeoutError."""
    async with asyncio.timeout(timeout_s):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                found = await check()
                if found:
                    return found
            await asyncio.sleep(0.25)


async def test_prometheus_scrapes_the_gateway_with_the_token_and_evaluates_the_rules(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fraud.yaml").write_text(POLICY)
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "wrong").write_text("not-the-admin-token-at-all")
    async with serve(
        tmp_path, registry, policies=policies, admin_token=TOKEN, metrics_auth="token"
    ) as server:
        await eventually(lambda: server.gateway.router.table("fraud") is not None)
        server.rollouts.tick("fraud")
        target = server.admin_url.removeprefix("http://")

        def job(name: str, credentials: Path) -> dict[str, Any]:
            return {
                "job_name": name,
                "static_configs": [{"targets": [target]}],
                "authorization": {"type": "Bearer", "credentials_file": str(credentials)},
            }

        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                job("rollguard", tmp_path / "token"),
                job("wrong-token", tmp_path / "wrong"),
            ],
        }
        async with prometheus(tmp_path, config) as url, aiohttp.ClientSession() as http:

            async def get(path: str, **params: str) -> Any:
                async with http.get(url + path, params=params) as resp:
                    if resp.status != 200:
                        return None
                    doc = await resp.json()
                    return doc["data"] if doc["status"] == "success" else None

            async def scraped() -> dict[str, dict[str, Any]] | None:
                data = await get("/api/v1/targets")
                targets = {t["labels"]["job"]: t for t in (data or {}).get("activeTargets", [])}
                done = len(targets) == 2 and all(t["health"] != "unknown" for t in targets.values())
                return targets if done else None

            targets = await _until(scraped)
            assert targets["rollguard"]["health"] == "up", targets["rollguard"]["lastError"]
            assert targets["wrong-token"]["health"] == "down"
            assert "403" in targets["wrong-token"]["lastError"]

            async def weight() -> list[Any] | None:
                data = await get("/api/v1/query", query="rollguard_candidate_weight_ratio")
                return data["result"] if data else None

            [series] = await _until(weight)
            assert series["metric"]["rollout"] == "fraud"
            assert series["metric"]["candidate"] == "1.1.0"
            assert float(series["value"][1]) == 0.25

            async def evaluated() -> list[dict[str, Any]] | None:
                data = await get("/api/v1/rules")
                rules = [r for g in (data or {}).get("groups", []) for r in g["rules"]]
                done = rules and all(r["lastEvaluation"][:4] != "0001" for r in rules)
                return rules if done else None

            rules = await _until(evaluated)
            assert len(rules) >= 10
            assert [r["name"] for r in rules if r["health"] != "ok"] == []
            firing = [r["name"] for r in rules if r.get("state") == "firing"]
            assert firing == [], f"alerts firing on a healthy gateway: {firing}"
