"""Shared set-up of the fleet tests: waiting with a deadline, background work, and what the
end-to-end tests serve with (policy file, stand-in upstream, environment, admin reads)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from load_tests.redis_server import RedisServer
from rollguard.proxy.fleet.audit import RedisAuditLog
from tests.proxy.support import start_upstream, write_remote_version

TOKEN = "fleet-test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROW = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]})


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Wait until `await condition()` holds, re-checking every 20 ms; TimeoutError after
    `timeout_s` (neither Redis nor another process has an event a test could await)."""
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110 - polling is the only way
            await asyncio.sleep(0.02)


@asynccontextmanager
async def running(work: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """Run `work` as a task for the block; cancelled and awaited when it ends."""
    task = asyncio.create_task(work)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def serve_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with the admin TOKEN and `settings`, and no Redis
    password (the test's redis-server has none)."""
    env = {**os.environ, "ROLLGUARD_ADMIN_TOKEN": TOKEN, **settings}
    env.pop("ROLLGUARD_REDIS_PASSWORD", None)
    return env


def rollout_policy(*steps: str) -> str:
    """The fleet tests' canary rollout of remote 1 -> 2 through `steps` (YAML flow
    mappings), rolled back on a candidate error rate 1 point over the stable's."""
    listed = "".join(f"    - {step}\n" for step in steps)
    return f"""\
apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: remote}}
spec:
  model: remote
  stable: "1"
  candidate: "2"
  strategy: canary
  split: random
  steps:
{listed}  interval: 0.2s
  checks:
    - {{metric: error_rate, max_increase_vs_stable: 0.01, min_samples: 30, on_fail: rollback}}
"""


def canary_policy(first_hold: str) -> str:
    """30 % held `first_hold` (and 30 requests), then 100 %."""
    return rollout_policy(f"{{weight: 30, hold: {first_hold}, min_requests: 30}}", "{weight: 100}")


def write_policy(tmp_path: Path, text: str) -> Path:
    """`text` as tmp_path/policies/remote.yaml; returns the policies directory."""
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "remote.yaml").write_text(text)
    return policies


@asynccontextmanager
async def upstream(
    registry: Path,
    failing: Collection[str] = (),
    when: Callable[[dict[str, Any]], bool] = lambda doc: True,
) -> AsyncIterator[None]:
    """`remote/1` and `remote/2`, `framework: http` versions served by one stand-in
    upstream; a version in `failing` answers 500 to every infer request whose body
    `when` holds for (all of them by default)."""

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def infer(request: web.Request) -> web.Response:
        version = request.match_info["version"]
        if version in failing and when(await request.json()):
            return web.json_response({"error": "boom"}, status=500)
        tensor = {"name": "y", "datatype": "FP32", "shape": [1], "data": [1.0]}
        return web.json_response({"model_name": "remote", "outputs": [tensor]})

    app = web.Application()
    app.router.add_get("/v2/models/remote/versions/{version}/ready", ready)
    app.router.add_post("/v2/models/remote/versions/{version}/infer", infer)
    runner, base = await start_upstream(app)
    for version in ("1", "2"):
        write_remote_version(registry, version, f"{base}/v2/models/remote/versions/{version}")
    try:
        yield
    finally:
        await runner.cleanup()


async def admin_get(http: aiohttp.ClientSession, url: str) -> Any:
    """GET `url` with the admin TOKEN; its JSON, after asserting a 200."""
    async with http.get(url, headers=AUTH) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def audit_entries(redis_server: RedisServer) -> list[dict[str, Any]]:
    """Every entry of the audit stream in `redis_server`, read on a client of its own."""
    client = redis_server.target.client()
    try:
        return await RedisAuditLog(client, redis_server.target).entries()
    finally:
        await client.aclose()


def assert_no_traceback(log: Path) -> None:
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
