"""The admin port: authenticated unless the operator says otherwise, hard to guess at.

Each test drives the real gateway over loopback or the real CLI (`rollguard.proxy.cli.main`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from rollguard.proxy.admin import LOCKOUT_LIMIT, MIN_TOKEN_CHARS
from rollguard.proxy.cli import main
from tests.proxy.support import serve, start_upstream

TOKEN = "correct-horse-battery-staple-42"
ROLLOUTS = "/admin/rollouts"


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    root.mkdir()
    return root


def _serve_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> int:
    for name in ("ROLLGUARD_ADMIN_TOKEN", "ROLLGUARD_ADMIN_AUTH", "ROLLGUARD_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "empty.yaml").write_text("{}\n")
    return main(
        ["serve", "--config", str(tmp_path / "empty.yaml"), "--registry", str(tmp_path),
         "--port", "0", "--admin-port", "0"]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "the admin API needs a token: set ROLLGUARD_ADMIN_TOKEN"),
        ({"ROLLGUARD_ADMIN_TOKEN": ""}, "ROLLGUARD_ADMIN_TOKEN is set but empty"),
        ({"ROLLGUARD_ADMIN_TOKEN": "x"}, "ROLLGUARD_ADMIN_TOKEN has 1 characters"),
        ({"ROLLGUARD_ADMIN_TOKEN": "a" * (MIN_TOKEN_CHARS - 1)}, f"has {MIN_TOKEN_CHARS - 1} "),
        ({"ROLLGUARD_ADMIN_TOKEN": "sixteen chars ok"}, "without spaces"),
        (
            {"ROLLGUARD_ADMIN_TOKEN": TOKEN, "ROLLGUARD_ADMIN_AUTH": "none"},
            "admin_auth is 'none' but ROLLGUARD_ADMIN_TOKEN is set",
        ),
    ],
    ids=["no-token", "empty", "one-char", "fifteen-chars", "spaces", "token-and-none"],
)
def test_serve_refuses_to_start_without_a_usable_token(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    says: str,
) -> None:
    assert _serve_cli(tmp_path, monkeypatch, **env) == 1
    err = capsys.readouterr().err
    assert err.startswith("rollguard: ") and says in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert TOKEN not in err


async def test_missing_malformed_and_wrong_credentials(tmp_path: Path, registry: Path) -> None:
    async with (
        serve(tmp_path, registry, admin_token=TOKEN) as server,
        aiohttp.ClientSession() as http,
    ):
        url = server.admin_url + ROLLOUTS
        async with http.get(url) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer realm=")
            assert "Authorization: Bearer" in (await r.json())["error"]
        async with http.get(url, headers={"Authorization": f"Basic {TOKEN}"}) as r:
            assert r.status == 401
            assert 'error="invalid_request"' in r.headers["WWW-Authenticate"]
        async with http.get(url, headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"}) as r:
            assert r.status == 403
            assert TOKEN not in await r.text()
        async with http.get(url, headers={"Authorization": f"bearer {TOKEN}"}) as r:
            assert r.status == 200
        for action in ("GET /admin/audit", f"POST {ROLLOUTS}/fraud/promote"):
            method, path = action.split()
            async with http.request(method, server.admin_url + path) as r:
                assert r.status == 401, action
        async with http.get(f"{server.admin_url}/metrics") as r:
            assert r.status == 200  # open: Prometheus scrapers carry no token


async def test_metrics_can_require_the_token(tmp_path: Path, registry: Path) -> None:
    async with (
        serve(tmp_path, registry, admin_token=TOKEN, metrics_auth="token") as server,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(f"{server.admin_url}/metrics") as r:
            assert r.status == 401
        async with http.get(f"{server.admin_url}/metrics", headers=server.admin_headers) as r:
            assert r.status == 200 and "rollguard_" in await r.text()


async def test_repeated_failures_from_one_client_are_rate_limited(
    tmp_path: Path, registry: Path
) -> None:
    async with (
        serve(tmp_path, registry, admin_token=TOKEN) as server,
        aiohttp.ClientSession() as http,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other,
    ):
        url = server.admin_url + ROLLOUTS
        wrong = {"Authorization": "Bearer " + "w" * 20}
        for _ in range(LOCKOUT_LIMIT):
            async with http.get(url, headers=wrong) as r:
                assert r.status == 403
        for headers in (wrong, server.admin_headers):  # even the right token waits now
            async with http.get(url, headers=headers) as r:
                assert r.status == 429
                assert 1 <= int(r.headers["Retry-After"]) <= 60
                assert "retry in" in (await r.json())["error"]
        async with other.get(url, headers=server.admin_headers) as r:
            assert r.status == 200  # another client address is not locked out


async def test_admin_answers_say_server_rollguard(tmp_path: Path, registry: Path) -> None:
    async with (
        serve(tmp_path, registry, admin_token=TOKEN) as server,
        aiohttp.ClientSession() as http,
    ):
        for path, headers in (
            (ROLLOUTS, server.admin_headers),
            (ROLLOUTS, {}),
            ("/nowhere", {}),
            ("/metrics", {}),
        ):
            async with http.get(server.admin_url + path, headers=headers) as r:
                assert r.headers["Server"] == "rollguard", path
        # A request aiohttp itself refuses (not HTTP at all) says so too.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.running.admin_port)
        writer.write(b"NOT HTTP\x00\r\n\r\n")
        await writer.drain()
        head = (await asyncio.wait_for(reader.read(4096), 5)).decode("latin-1")
        writer.close()
        assert head.split(" ", 2)[1] == "400", head
        assert "\r\nServer: rollguard\r\n" in head, head
        assert "aiohttp" not in head and "Python" not in head


async def test_cli_sends_the_token_and_never_follows_a_redirect(
    tmp_path: Path,
    registry: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A redirect to another origin would carry the bearer token there (urllib keeps the
    Authorization header across redirects): the CLI stops at the 3xx and says so."""
    elsewhere: list[str | None] = []

    async def collect(request: web.Request) -> web.Response:
        elsewhere.append(request.headers.get("Authorization"))
        return web.json_response({"rollouts": [], "rejected": []})

    collector = web.Application()
    collector.router.add_route("*", "/{tail:.*}", collect)
    collector_runner, collector_url = await start_upstream(collector)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(collector_url + request.path_qs)

    redirector = web.Application()
    redirector.router.add_route("*", "/{tail:.*}", redirect)
    redirector_runner, redirector_url = await start_upstream(redirector)
    monkeypatch.setenv("ROLLGUARD_ADMIN_TOKEN", TOKEN)
    try:
        async with serve(tmp_path, registry, admin_token=TOKEN) as server:
            assert await asyncio.to_thread(main, ["status", "--url", server.admin_url]) == 0
            assert "no rollouts" in capsys.readouterr().out
            code = await asyncio.to_thread(main, ["status", "--url", redirector_url])
            assert code == 1
            err = capsys.readouterr().err
            host = collector_url.removeprefix("http://")
            assert f"307 redirect to http://{host} not followed" in err
            assert TOKEN not in err
            code = await asyncio.to_thread(main, ["pause", "fraud", "--url", redirector_url])
            assert code == 1 and "not followed" in capsys.readouterr().err
            assert elsewhere == []  # the other origin never saw a request, let alone the token
            monkeypatch.setenv("ROLLGUARD_ADMIN_TOKEN", "not-the-right-token")
            assert await asyncio.to_thread(main, ["status", "--url", server.admin_url]) == 1
            assert "403" in capsys.readouterr().err
    finally:
        await redirector_runner.cleanup()
        await collector_runner.cleanup()


async def test_actors_and_reasons_are_one_line(tmp_path: Path, registry: Path) -> None:
    """They are logged as they are: a newline let a token holder forge a log line (found
    by an adversarial probe). Checked before the rollout is looked up."""
    forged = "evil\n2026-12-07 17:00:00,000 INFO rollguard.rollouts: promoted by alice"
    async with (
        serve(tmp_path, registry, admin_token=TOKEN) as server,
        aiohttp.ClientSession() as http,
    ):
        url = f"{server.admin_url}{ROLLOUTS}/fraud/pause"
        for body in ({"actor": forged}, {"actor": "bob", "reason": "x\ry"}):
            async with http.post(url, json=body, headers=server.admin_headers) as r:
                assert r.status == 400
                assert "must not contain control characters" in (await r.json())["error"]
        headers = {**server.admin_headers, "x-rollguard-actor": "bob\tsmith"}
        async with http.post(url, headers=headers) as r:
            assert r.status == 400
        async with http.post(url, json={"actor": "bob"}, headers=server.admin_headers) as r:
            assert r.status == 404  # a fine actor reaches the lookup
