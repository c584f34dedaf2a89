"""`rollguard audit verify|export --state redis://...` on a fleet's audit stream, run as a
user runs it; and `state: redis://` in the settings taken as fleet mode (or refused, naming
the fault), never as a directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from rollguard.policy.keys import AuditKey
from rollguard.proxy.fleet.audit import RedisAuditLog
from rollguard.proxy.settings import SettingsError, load_settings
from tests.fleet.conftest import RedisServer
from tests.proxy.test_cli import cli

SECRET = "fleet-cli-audit-key-0123456789abcdef"


async def test_audit_verify_and_export_read_the_stream(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    stream = RedisAuditLog(client, redis_server.target, key=AuditKey(SECRET.encode()))
    for step in range(3):
        await stream.append("decision", "shop", "rollguard", {"step": step})
    keyed = {"ROLLGUARD_AUDIT_KEY": SECRET}

    done = cli("audit", "verify", "--state", redis_server.url, env=keyed)
    assert done.returncode == 0, done.stderr
    assert "3 entries, chain intact, sealed with audit key" in done.stdout
    assert redis_server.url in done.stdout

    done = cli("audit", "--state", redis_server.url, "verify", env={"ROLLGUARD_AUDIT_KEY": ""})
    assert done.returncode == 1 and "needs the key" in done.stderr

    done = cli("audit", "export", "--state", redis_server.url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == await stream.entries()

    await client.xdel("rollguard:audit", "2-0")
    done = cli("audit", "verify", "--state", redis_server.url, env=keyed)
    assert done.returncode == 1
    assert "fails at entry 2: seq is 3, expected 2" in done.stderr


def test_an_unreachable_redis_is_one_line(redis_server: RedisServer) -> None:
    redis_server.stop()
    done = cli("audit", "verify", "--state", redis_server.url)
    assert done.returncode == 1 and done.stderr.startswith("rollguard: redis at redis://")
    assert "Traceback" not in done.stderr


def test_a_redis_state_is_fleet_mode_not_a_directory(tmp_path: Path) -> None:
    config = tmp_path / "rollguard.yaml"
    config.write_text("state: redis://127.0.0.1:6379/0\n")
    settings = load_settings(config, environ={})
    assert settings.fleet_state == "redis://127.0.0.1:6379/0"
    assert not str(settings.state).startswith("redis")
    assert not (tmp_path / "redis:").exists()
    env = {"ROLLGUARD_STATE": "rediss://ops@redis.example:6380/2"}
    assert load_settings(config, environ=env).fleet_state == env["ROLLGUARD_STATE"]


@pytest.mark.parametrize(
    ("state", "fault"),
    [
        ("redis://:secret@127.0.0.1:6379/0", "ROLLGUARD_REDIS_PASSWORD"),
        ("redis://127.0.0.1:6379/zero", "is not a number"),
    ],
)
def test_a_redis_state_that_cannot_be_used_is_refused_at_start(
    tmp_path: Path, state: str, fault: str
) -> None:
    config = tmp_path / "rollguard.yaml"
    config.write_text(f"state: {state}\n")
    with pytest.raises(SettingsError, match=fault) as caught:
        load_settings(config, environ={})
    assert "secret" not in str(caught.value)
