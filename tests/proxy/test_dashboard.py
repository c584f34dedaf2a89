"""The rollout dashboard /ui on the admin port, driven in headless Chromium (Debian's
`chromium`, through Playwright) against the real gateway over loopback: the token
given in a form, the rollout shown, an action confirmed and applied, one the gateway
refuses shown with its reason, a rollback made elsewhere shown live, no request leaving
the admin origin, and a screenshot kept."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, Page, Request, Route, async_playwright, expect

from rollguard.proxy.dashboard import CONTENT_SECURITY_POLICY
from rollguard.serving.demo.build import load_eval_data
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import Server, serve
from tests.serving.support import eventually

TOKEN = "dashboard-test-token-0123456789"
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
  steps:
    - {weight: 20, hold: 0s, min_requests: 1000}
    - {weight: 100}
  checks:
    - {metric: error_rate, max: 0.01, min_samples: 20, on_fail: rollback}
    - {metric: latency_p99, max_ratio_to_stable: 1.5, on_fail: rollback}
    - {metric: srm, on_fail: alert}
"""
# Where the test keeps its screenshot besides tmp_path (docs/dashboard.png is made this way).
SCREENSHOT_ENV = "ROLLGUARD_DASHBOARD_SCREENSHOT"


def _chromium() -> str | None:
    """Debian's browser binary (its /usr/bin/chromium is a shell wrapper around it)."""
    for candidate in ("/usr/lib/chromium/chromium", "chromium", "chromium-browser"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium not found: apt-get install chromium (.ci/run installs it)",
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


async def _traffic(server: Server, n: int, offset: int = 0) -> None:
    """`n` sticky requests, then their true labels as feedback (accuracy per variant)."""
    x, y = load_eval_data()
    labels = []
    async with aiohttp.ClientSession() as http:
        for i in range(offset, offset + n):
            row = x[i % len(x)].tolist()
            body = {
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": row}]
            }
            headers = {"x-user-id": f"user-{i}"}
            url = f"{server.url}/v2/models/fraud/infer"
            async with http.post(url, json=body, headers=headers) as r:
                assert r.status == 200
                labels.append({"id": r.headers["x-request-id"], "label": int(y[i % len(y)])})
        async with http.post(f"{server.url}/v2/models/fraud/feedback", json=labels) as r:
            assert r.status == 200, await r.text()


async def _confirm(page: Page, card: str, action: str, actor: str, reason: str) -> None:
    await page.locator(f'{card} button[data-action="{action}"]').click()
    dialog = page.locator("dialog#confirm")
    await expect(dialog).to_be_visible()
    await expect(page.locator("#confirm-title")).to_have_text(f"{action} fraud?")
    await page.locator("#confirm-actor").fill(actor)
    await page.locator("#confirm-reason").fill(reason)
    await page.locator("#confirm-ok").click()
    await expect(dialog).to_be_hidden()


async def test_the_dashboard_shows_a_rollout_acts_on_it_and_shows_a_rollback_live(
    tmp_path: Path, make_registry: MakeRegistry, browser: Browser
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fraud.yaml").write_text(POLICY)
    async with serve(tmp_path, registry, policies=policies, admin_token=TOKEN) as server:
        await eventually(lambda: server.gateway.router.table("fraud") is not None)
        await _traffic(server, 60)
        server.rollouts.tick("fraud")

        page = await browser.new_page(viewport={"width": 1280, "height": 1000})
        origin = server.admin_url
        elsewhere: list[str] = []

        async def only_this_origin(route: Route, request: Request) -> None:
            if request.url.startswith(origin + "/"):
                await route.continue_()
            else:
                elsewhere.append(request.url)
                await route.abort()

        await page.route("**/*", only_this_origin)
        answer = await page.goto(f"{origin}/ui")
        assert answer is not None and answer.status == 200
        assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY

        # No token yet: the admin API answers 401 and the page asks for one.
        await expect(page.locator("#login")).to_be_visible()
        await page.locator("#token").fill("not-the-token-but-long-enough")
        await page.locator("#login-form button[type=submit]").click()
        await expect(page.locator("#login-error")).to_contain_text("not the one")
        await page.locator("#token").fill(TOKEN)
        await page.locator("#login-form button[type=submit]").click()

        card = 'article[data-rollout="fraud"]'
        await expect(page.locator(f"{card} [data-field=phase]")).to_have_text("progressing")
        await expect(page.locator(f"{card} [data-field=weight]")).to_have_text("20 %")
        await expect(page.locator(f'{card} tr[data-metric="error_rate"]')).to_contain_text(
            "inconclusive"
        )
        await expect(page.locator(f"{card} [data-field=srm]")).to_contain_text("configured")
        stable_row = page.locator(f'{card} tr[data-role="stable"]')
        await expect(stable_row).to_contain_text("1.0.0")
        accuracy = stable_row.locator("td").nth(10)  # labelled by the feedback above
        await expect(accuracy).to_contain_text("%")
        assert TOKEN not in page.url
        assert await page.evaluate("sessionStorage.getItem('rollguard.token')") == TOKEN

        # Cancelled: nothing happens.
        await page.locator(f'{card} button[data-action="promote"]').click()
        await page.locator("#confirm-cancel").click()
        await expect(page.locator("dialog#confirm")).to_be_hidden()
        assert server.rollouts.describe("fraud")["phase"] == "progressing"

        # Confirmed: the gateway pauses the rollout, and the audit names who did it.
        await _confirm(page, card, "pause", "alice", "checking a dashboard")
        await expect(page.locator(f"{card} [data-field=phase]")).to_have_text("paused")
        assert server.rollouts.describe("fraud")["phase"] == "paused"
        paused = [e for e in server.rollouts.audit_entries(since=None, until=None, rollout="fraud")
                  if e["actor"] == "alice"]  # fmt: skip
        assert paused, "the pause is not in the audit log under its actor"
        await expect(page.locator(f'{card} button[data-action="resume"]')).to_be_enabled()
        await _confirm(page, card, "resume", "alice", "")
        await expect(page.locator(f"{card} [data-field=phase]")).to_have_text("progressing")

        # More traffic while the page polls: the charts gain points.
        await _traffic(server, 60, offset=60)
        server.rollouts.tick("fraud")
        await expect(page.locator(f"{card} .chart path.line.stable").first).to_be_attached()

        # Alice opens a pause while another operator (bob, through the CLI) rolls back: her
        # confirmation is refused with the gateway's reason, and once she closes the
        # dialog the page shows bob's rollback without a reload.
        await page.locator(f'{card} button[data-action="pause"]').click()
        await expect(page.locator("dialog#confirm")).to_be_visible()
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{origin}/admin/rollouts/fraud/rollback",
                json={"actor": "bob", "reason": "error budget"},
                headers=server.admin_headers,
            ) as resp,
        ):
            assert resp.status == 200
        await page.locator("#confirm-actor").fill("alice")
        await page.locator("#confirm-ok").click()
        await expect(page.locator("#confirm-error")).to_contain_text("only rollback applies")
        await expect(page.locator(f"{card} [data-field=phase]")).to_have_text("progressing")
        await page.locator("#confirm-cancel").click()
        await expect(page.locator(f"{card} [data-field=phase]")).to_have_text(
            "rolled back", timeout=10_000
        )
        await expect(page.locator(f"{card} [data-field=weight]")).to_have_text("0 %")
        by_bob = page.locator(f"{card} .timeline tbody tr").first  # newest first
        await expect(by_bob).to_contain_text("bob")
        await expect(by_bob).to_contain_text("rolled_back")
        await expect(page.locator(f'{card} button[data-action="rollback"]')).to_be_disabled()

        shot = tmp_path / "dashboard.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if keep := os.environ.get(SCREENSHOT_ENV):
            shutil.copyfile(shot, keep)
        assert elsewhere == [], f"the page reached beyond the admin origin: {elsewhere}"


async def test_the_dashboard_assets_ship_with_a_strict_policy_and_no_data(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """The page, script and style answer without credentials (they hold no data) with a
    policy allowing only this origin's script; /admin/ still needs the token."""
    async with (
        serve(tmp_path, make_registry("fraud/1.0.0"), admin_token=TOKEN) as server,
        aiohttp.ClientSession() as http,
    ):
        for path, kind in (("/ui", "text/html"), ("/ui/app.js", "text/javascript"),
                           ("/ui/app.css", "text/css")):  # fmt: skip
            async with http.get(server.admin_url + path) as resp:
                assert resp.status == 200, path
                assert resp.headers["Content-Type"].startswith(kind)
                assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
                assert resp.headers["X-Frame-Options"] == "DENY"
                text = await resp.text()
                assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
                assert "https://" not in text
        async with http.get(server.admin_url + "/ui") as resp:
            page = await resp.text()
        assert "<script>" not in page and "style=" not in page  # nothing inline
        async with http.get(server.admin_url + "/admin/rollouts") as resp:
            assert resp.status == 401
        async with http.get(server.admin_url + "/ui/nothing.js") as resp:
            assert resp.status == 404


async def test_without_an_admin_token_the_page_needs_none_on_loopback(
    tmp_path: Path, make_registry: MakeRegistry, browser: Browser
) -> None:
    """`admin_auth: none` (loopback only): no login form; the page reads /admin/ directly
    and says when there is no rollout."""
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        page = await browser.new_page()
        await page.goto(f"{server.admin_url}/ui")
        await expect(page.locator("#empty")).to_be_visible()
        await expect(page.locator("#login")).to_be_hidden()
        await expect(page.locator("#status")).to_contain_text("updated")
