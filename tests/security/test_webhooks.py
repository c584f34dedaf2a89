"""Webhooks cannot steer the gateway: a policy's notify URL never reaches admin.

The attack reproduced in issue 13: a policy whose `notify` URL is the admin promote
URL (or an outside receiver answering 307 to it) promoted a rollout past
`require_approval`, audited as actor `engine`. Each test drives a real gateway over
loopback, with the operator having allowed loopback webhooks (the most permissive
setting that makes the attack possible at all): the gateway's own ports are refused at
send time and redirects are never followed, with `admin_auth: none` and with a token.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.faults.support import until
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import Server, serve, start_upstream

TOKEN = "s3cret-admin-token-for-tests"
POLICY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: fraud}}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "1.1.0"
  strategy: canary
  key: header:x-user-id
  require_approval: true
  interval: 0.1s
  steps:
    - {{weight: 10}}
    - {{weight: 100}}
  notify:
    - {{webhook: "{hook}", timeout: 2s, retries: 2{extra}}}
"""
AUTH_MODES = [
    pytest.param({}, id="admin_auth-none"),
    pytest.param({"admin_token": TOKEN}, id="token"),
]


async def _rollout(server: Server, http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.get(f"{server.admin_url}/admin/rollouts", headers=server.admin_headers) as r:
        assert r.status == 200
        return dict(await r.json())


async def _deliveries(server: Server, http: aiohttp.ClientSession, result: str) -> float:
    async with http.get(f"{server.admin_url}/metrics") as r:
        text = await r.text()
    found = re.search(
        rf'^rollguard_webhook_deliveries_total{{result="{result}"}} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


async def _phase(server: Server, http: aiohttp.ClientSession) -> str | None:
    doc = await _rollout(server, http)
    return next((r["phase"] for r in doc["rollouts"] if r["name"] == "fraud"), None)


async def _audited_actions(server: Server, http: aiohttp.ClientSession) -> list[tuple[str, str]]:
    async with http.get(f"{server.admin_url}/admin/audit", headers=server.admin_headers) as r:
        entries = (await r.json())["entries"]
    return [(e["kind"], e.get("data", {}).get("action", "")) for e in entries]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[list[str], Callable[[str], None], str]]:
    """An outside webhook receiver on loopback answering 307 to wherever it is told."""
    seen: list[str] = []
    target: dict[str, str] = {}

    async def hook(request: web.Request) -> web.Response:
        seen.append(await request.text())
        raise web.HTTPTemporaryRedirect(target["location"])

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner, url = await start_upstream(app)
    try:
        yield seen, lambda location: target.update(location=location), f"{url}/hook"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("auth", AUTH_MODES)
async def test_a_webhook_to_the_admin_promote_url_does_not_promote(
    tmp_path: Path, make_registry: MakeRegistry, auth: dict[str, Any]
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    async with (
        serve(
            tmp_path, registry, policy_poll_s=0.1, webhook_allowed_hosts=("127.0.0.1",), **auth
        ) as server,
        aiohttp.ClientSession() as http,
    ):
        promote = f"{server.admin_url}/admin/rollouts/fraud/promote"
        (tmp_path / "policies" / "fraud.yaml").write_text(POLICY.format(hook=promote, extra=""))
        await until(lambda: _phase_is(server, http, "awaiting_approval"))
        # Every announcement so far (start, steps, awaiting approval) was refused, none sent.
        await until(lambda: _at_least(server, http, "refused", 2))
        assert await _deliveries(server, http, "delivered") == 0
        assert await _phase(server, http) == "awaiting_approval"
        assert ("admin", "promote") not in await _audited_actions(server, http)


@pytest.mark.parametrize("auth", AUTH_MODES)
async def test_a_receiver_redirecting_to_admin_is_not_followed(
    tmp_path: Path,
    make_registry: MakeRegistry,
    auth: dict[str, Any],
    receiver: tuple[list[str], Callable[[str], None], str],
) -> None:
    seen, redirect_to, hook = receiver
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    async with (
        serve(
            tmp_path, registry, policy_poll_s=0.1, webhook_allowed_hosts=("127.0.0.1",), **auth
        ) as server,
        aiohttp.ClientSession() as http,
    ):
        redirect_to(f"{server.admin_url}/admin/rollouts/fraud/promote")
        (tmp_path / "policies" / "fraud.yaml").write_text(POLICY.format(hook=hook, extra=""))
        await until(lambda: _phase_is(server, http, "awaiting_approval"))
        await until(lambda: _at_least(server, http, "refused", 2))
        assert len(seen) >= 2  # the receiver was reached: the redirect is what was refused
        assert await _phase(server, http) == "awaiting_approval"
        assert ("admin", "promote") not in await _audited_actions(server, http)


async def _phase_is(server: Server, http: aiohttp.ClientSession, phase: str) -> bool:
    return await _phase(server, http) == phase


async def _at_least(server: Server, http: aiohttp.ClientSession, result: str, n: int) -> bool:
    return await _deliveries(server, http, result) >= n


async def test_a_name_resolving_to_the_gateway_is_refused_at_send_time(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """`localhost` is allowed by the operator; it resolves to loopback, where the admin
    port listens: the check is on the resolved address and port, not on the name."""
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    async with (
        serve(
            tmp_path, registry, policy_poll_s=0.1, webhook_allowed_hosts=("localhost",)
        ) as server,
        aiohttp.ClientSession() as http,
    ):
        hook = f"http://localhost:{server.running.admin_port}/admin/rollouts/fraud/promote"
        (tmp_path / "policies" / "fraud.yaml").write_text(POLICY.format(hook=hook, extra=""))
        await until(lambda: _phase_is(server, http, "awaiting_approval"))
        await until(lambda: _at_least(server, http, "refused", 2))
        assert await _phase(server, http) == "awaiting_approval"


async def test_a_policy_naming_a_host_not_allowed_is_rejected_naming_host_and_setting(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policy = tmp_path / "policies" / "fraud.yaml"
    async with (
        serve(tmp_path, registry, policy_poll_s=0.1) as server,
        aiohttp.ClientSession() as http,
    ):
        policy.write_text(POLICY.format(hook="http://169.254.169.254/latest", extra=""))

        async def rejected() -> bool:
            return bool((await _rollout(server, http))["rejected"])

        await until(rejected)
        [entry] = (await _rollout(server, http))["rejected"]
        assert "'169.254.169.254'" in entry["error"]
        assert "webhook_allowed_hosts (allowed: none)" in entry["error"].replace(" setting", "")
        assert await _phase(server, http) is None  # never loaded


async def test_allowed_webhooks_deliver_with_headers_from_the_environment(
    tmp_path: Path, make_registry: MakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_AUTH", "Bearer from-the-environment")
    got: list[tuple[str | None, str | None]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((request.headers.get("Authorization"), request.headers.get("Host")))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner, url = await start_upstream(app)
    port = int(url.rsplit(":", 1)[1])
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    extra = ", headers_from_env: {Authorization: HOOK_AUTH}"
    try:
        async with (
            serve(
                tmp_path, registry, policy_poll_s=0.1, webhook_allowed_hosts=(f"localhost:{port}",)
            ) as server,
            aiohttp.ClientSession() as http,
        ):
            hook_url = f"http://localhost:{port}/hook"
            (tmp_path / "policies" / "fraud.yaml").write_text(
                POLICY.format(hook=hook_url, extra=extra)
            )
            await until(lambda: _at_least(server, http, "delivered", 1))
            assert got[0] == ("Bearer from-the-environment", f"localhost:{port}")
            # Without the variable, nothing is sent: a refused delivery names the variable.
            monkeypatch.delenv("HOOK_AUTH")
            before = len(got)
            async with http.post(
                f"{server.admin_url}/admin/rollouts/fraud/pause", json={"actor": "alice"}
            ) as r:
                assert r.status == 200, await r.text()
            await until(lambda: _at_least(server, http, "refused", 1))
            assert len(got) == before
    finally:
        await runner.cleanup()
