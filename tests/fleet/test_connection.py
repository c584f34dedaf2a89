"""The `state: redis://` target: parsing, the password from the environment, safe display."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from rollguard.proxy.fleet.connection import PASSWORD_ENV, RedisTarget
from rollguard.proxy.fleet.errors import FleetUnavailable, InvalidTarget
from rollguard.proxy.fleet.store import Fence, RedisStateStore
from tests.fleet.conftest import RedisServer


def test_url_parts() -> None:
    target = RedisTarget.parse("rediss://ops@redis.internal:6380/3", {PASSWORD_ENV: "s3cret"})
    assert (target.host, target.port, target.db, target.tls) == ("redis.internal", 6380, 3, True)
    assert (target.username, target.password) == ("ops", "s3cret")
    assert target.display == "rediss://ops@redis.internal:6380/3"
    assert "s3cret" not in repr(target)
    plain = RedisTarget.parse("redis://127.0.0.1", {})
    assert (plain.port, plain.db, plain.tls, plain.password) == (6379, 0, False, None)


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("http://h:1/0", "scheme 'http'"),
        ("redis://:hunter2@h:1/0", PASSWORD_ENV),
        ("redis://h:1/x", "database 'x'"),
        ("redis:///0", "no host"),
        ("redis://h:99999/0", "not a URL"),
        ("redis://h:1/0?ssl=1", "query"),
    ],
)
def test_bad_url_is_refused_naming_the_fault(url: str, names: str) -> None:
    with pytest.raises(InvalidTarget) as caught:
        RedisTarget.parse(url, {})
    assert names in str(caught.value)
    assert "hunter2" not in str(caught.value)


async def test_password_comes_from_the_environment(redis_server: RedisServer) -> None:
    admin = redis_server.target.client()
    try:
        await admin.config_set("requirepass", "fleet-pass")
    finally:
        await admin.aclose()
    url = redis_server.url
    for env, works in (
        ({}, False),
        ({PASSWORD_ENV: "wrong"}, False),
        ({PASSWORD_ENV: "fleet-pass"}, True),
    ):
        target = RedisTarget.parse(url, env)
        client: aioredis.Redis = target.client()
        try:
            store = RedisStateStore(client, target)
            if works:
                assert await store.save("r", {"phase": "x"}, fence=Fence(0)) == 1
                continue
            with pytest.raises(FleetUnavailable) as caught:
                await store.load("r")
            assert url in str(caught.value)
            assert "fleet-pass" not in str(caught.value) and "wrong" not in str(caught.value)
        finally:
            await client.aclose()
