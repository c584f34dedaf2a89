"""Data-plane authentication and per-client rate limits, end to end over loopback.

Off by default (every other test serves without them); configured, a model's routes
(inference, /predict, feedback, metadata) need a credential: no key or a bad one is 401
with a challenge, a key without the scope or for another model is 403, a JWT signed with
the configured secret is taken. Rate limits are token buckets per client (API key, JWT
subject, a configured header, else the address), 429 with Retry-After when empty, sized by
tiers the credentials name.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import numpy as np
import pytest
import yaml

from rollguard.proxy.auth import AuthConfigError
from rollguard.proxy.gateway import Gateway
from rollguard.proxy.settings import Settings
from rollguard.serving.demo.build import load_eval_data
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import serve

X, _ = load_eval_data()
SECRET = "s" * 40  # ROLLGUARD_JWT_SECRET: at least 32 bytes
KEYS = {  # name: (key, scopes, models, tier)
    "app": ("app-key-0123456789abcdef", ["infer", "feedback"], ["fraud"], None),
    "labeller": ("labeller-key-0123456789ab", ["feedback"], ["fraud"], None),
    "digits-app": ("digits-key-0123456789abcd", ["infer"], ["digits"], None),
    "batch": ("batch-key-0123456789abcdef", ["infer"], None, "gold"),
}


def _keys_file(tmp_path: Path) -> Path:
    entries: list[dict[str, Any]] = []
    for name, (key, scopes, models, tier) in KEYS.items():
        entry: dict[str, Any] = {
            "name": name,
            "sha256": hashlib.sha256(key.encode()).hexdigest(),
            "scopes": scopes,
        }
        if models is not None:
            entry["models"] = models
        if tier is not None:
            entry["tier"] = tier
        entries.append(entry)
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


def _bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


def _token(secret: str = SECRET, **claims: Any) -> str:
    base = {"sub": "svc-42", "exp": int(time.time()) + 300, "scope": "infer feedback"}
    return jwt.encode(base | claims, secret, algorithm="HS256")


def _unsigned(claims: dict[str, Any]) -> str:
    """A token with `alg: none` and no signature."""
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    return f"{header.decode()}.{body.decode()}."


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made by hand (PyJWT refuses a secret that looks like a key)."""
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    signature = hmac.new(secret, header + b"." + body, hashlib.sha256).digest()
    return b".".join((header, body, base64.urlsafe_b64encode(signature).rstrip(b"="))).decode()


ROW = {"features": X[0].tolist()}


async def _status(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], body: Any = ROW
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with http.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def test_api_keys_gate_every_model_route(tmp_path: Path, make_registry: MakeRegistry) -> None:
    registry = make_registry("fraud/1.0.0", "digits/1.0.0")
    auth = {"required": True, "api_keys_file": str(_keys_file(tmp_path))}
    async with serve(tmp_path, registry, data_auth=auth) as server, aiohttp.ClientSession() as http:
        predict = f"{server.url}/predict/fraud"
        status, doc, headers = await _status(http, predict, {})
        assert status == 401 and "needs a credential" in doc["error"]
        assert headers["WWW-Authenticate"].startswith('Bearer realm="rollguard"')
        status, doc, headers = await _status(http, predict, {"Authorization": "Bearer nope"})
        assert status == 401 and "unknown API key" in doc["error"]
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
        status, doc, _ = await _status(http, predict, {"Authorization": "Basic abc"})
        assert status == 401
        # A key without the scope, and a key for another model: 403.
        status, doc, headers = await _status(http, predict, _bearer("labeller"))
        assert status == 403 and "'infer'" in doc["error"]
        assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
        status, doc, _ = await _status(http, predict, _bearer("digits-app"))
        assert status == 403 and "'fraud'" in doc["error"]
        # The right key, as a bearer token or as x-api-key; V2 inference and metadata too.
        assert (await _status(http, predict, _bearer("app")))[0] == 200
        assert (await _status(http, predict, {"x-api-key": KEYS["app"][0]}))[0] == 200
        v2 = {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 30], "data": X[0].tolist()}
            ]
        }
        infer = f"{server.url}/v2/models/fraud/infer"
        assert (await _status(http, infer, {}, v2))[0] == 401
        assert (await _status(http, infer, _bearer("app"), v2))[0] == 200
        async with http.get(f"{server.url}/v2/models/fraud") as resp:
            assert resp.status == 401
        async with http.get(f"{server.url}/v2/models/fraud", headers=_bearer("app")) as resp:
            assert resp.status == 200
        digits = {"features": np.zeros(64).tolist()}
        assert (await _status(http, f"{server.url}/predict/digits", _bearer("app"), digits))[
            0
        ] == 403
        assert (await _status(http, f"{server.url}/predict/digits", _bearer("digits-app"), digits))[
            0
        ] == 200
        # Health and server metadata stay open: probes carry no credentials.
        for path in ("/v2/health/ready", "/v2/health/live", "/v2"):
            async with http.get(server.url + path) as resp:
                assert resp.status == 200, path
        # Refusals are counted by reason, labelled only with models the registry knows.
        async with http.get(f"{server.admin_url}/metrics") as resp:
            text = await resp.text()
        assert 'model="fraud",reason="unauthenticated"' in text
        assert 'model="fraud",reason="forbidden"' in text


async def test_feedback_is_under_the_same_auth_and_scoped_to_the_caller(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0")
    auth = {"required": True, "api_keys_file": str(_keys_file(tmp_path))}
    async with serve(tmp_path, registry, data_auth=auth) as server, aiohttp.ClientSession() as http:
        status, doc, _ = await _status(http, f"{server.url}/predict/fraud", _bearer("app"))
        assert status == 200
        request_id = doc["id"]
        feedback = f"{server.url}/v2/models/fraud/feedback"
        label = {"id": request_id, "label": 1}
        assert (await _status(http, feedback, {}, label))[0] == 401
        # The labeller may label, but not the app's requests: they are not its own.
        status, doc, _ = await _status(http, feedback, _bearer("labeller"), label)
        assert status == 404 and "from this caller" in doc["error"]
        status, doc, _ = await _status(http, feedback, _bearer("labeller"), [label])
        assert (status, doc) == (200, {"accepted": [], "unknown": [request_id], "expired": []})
        status, doc, _ = await _status(http, feedback, _bearer("app"), label)
        assert (status, doc) == (200, {"accepted": [request_id], "unknown": [], "expired": []})


async def test_jwt_with_the_configured_secret(tmp_path: Path, make_registry: MakeRegistry) -> None:
    registry = make_registry("fraud/1.0.0", "digits/1.0.0")
    auth = {"models": ["fraud"]}  # only fraud needs a credential; digits stays open
    async with (
        serve(tmp_path, registry, data_auth=auth, jwt_secret=SECRET) as server,
        aiohttp.ClientSession() as http,
    ):
        predict = f"{server.url}/predict/fraud"
        ok = {"Authorization": f"Bearer {_token()}"}
        assert (await _status(http, predict, ok))[0] == 200
        refused = {
            "another secret": _token(secret="t" * 40),
            "expired": _token(exp=int(time.time()) - 600),
            "no sub": jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256"),
            "alg none": _unsigned({"sub": "x", "exp": int(time.time()) + 60}),
        }
        for why, token in refused.items():
            status, doc, _ = await _status(http, predict, {"Authorization": f"Bearer {token}"})
            assert status == 401, why
            assert "not valid" in doc["error"] or "expired" in doc["error"], why
        scopes = {"Authorization": f"Bearer {_token(scope='feedback')}"}
        assert (await _status(http, predict, scopes))[0] == 403
        models = {"Authorization": f"Bearer {_token(models=['digits'])}"}
        assert (await _status(http, predict, models))[0] == 403
        digits = {"features": np.zeros(64).tolist()}
        assert (await _status(http, f"{server.url}/predict/digits", {}, digits))[0] == 200
        # The request a JWT made is labelled under its subject.
        status, doc, _ = await _status(http, predict, ok)
        label = {"id": doc["id"], "label": 0}
        feedback = f"{server.url}/v2/models/fraud/feedback"
        other = {"Authorization": f"Bearer {_token(sub='svc-43')}"}
        assert (await _status(http, feedback, other, label))[0] == 404
        assert (await _status(http, feedback, ok, label))[1]["accepted"] == [doc["id"]]


async def test_rate_limits_per_client_with_burst_and_tiers(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0")
    auth = {"models": ["nothing-needs-it"], "api_keys_file": str(_keys_file(tmp_path))}
    limits = {
        "default": {"rate": 0.5, "burst": 3},
        "tiers": {"gold": {"rate": 1000, "burst": 1000}},
        "header": "x-client-id",
    }
    async with (
        serve(tmp_path, registry, data_auth=auth, rate_limits=limits) as server,
        aiohttp.ClientSession() as http,
    ):
        predict = f"{server.url}/predict/fraud"

        async def statuses(headers: dict[str, str], n: int) -> list[int]:
            return [(await _status(http, predict, headers))[0] for _ in range(n)]

        # A client named by the configured header: its burst, then 429 with Retry-After.
        alice = {"x-client-id": "alice"}
        assert await statuses(alice, 3) == [200, 200, 200]
        status, doc, headers = await _status(http, predict, alice)
        assert status == 429 and "burst 3" in doc["error"]
        assert int(headers["Retry-After"]) >= 1
        # Another client has its own bucket; so has each API key (whatever header it sends).
        assert await statuses({"x-client-id": "bob"}, 3) == [200, 200, 200]
        app = _bearer("app") | alice
        assert await statuses(app, 4) == [200, 200, 200, 429]
        # A key of the gold tier is not held to the default.
        assert set(await statuses(_bearer("batch"), 30)) == {200}
        # Health is never limited.
        async with http.get(f"{server.url}/v2/health/ready", headers=alice) as resp:
            assert resp.status == 200
        async with http.get(f"{server.admin_url}/metrics") as resp:
            assert 'model="fraud",reason="rate_limited"' in await resp.text()


async def test_without_a_header_clients_are_told_apart_by_address(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0")
    limits = {"default": {"rate": 0.5, "burst": 2}}
    async with (
        serve(tmp_path, registry, rate_limits=limits) as server,
        aiohttp.ClientSession() as http,
    ):
        predict = f"{server.url}/predict/fraud"
        got = [(await _status(http, predict, {"x-client-id": str(i)}))[0] for i in range(3)]
        assert got == [200, 200, 429]  # no header configured: the header is not trusted


def test_a_keys_file_naming_an_unknown_tier_is_a_start_error(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0")

    def settings(**changes: Any) -> Settings:
        return Settings(
            registry=registry,
            policies=tmp_path,
            state=tmp_path / "state",
            admin_auth="none",
            **changes,
        )

    keys = {"required": True, "api_keys_file": str(_keys_file(tmp_path))}
    silver = {"default": {"rate": 1, "burst": 1}, "tiers": {"silver": {"rate": 5, "burst": 5}}}
    with pytest.raises(AuthConfigError, match="tier 'gold'"):
        Gateway(settings(data_auth=keys, rate_limits=silver))
    with pytest.raises(AuthConfigError, match="names no source"):
        Gateway(settings(data_auth={"required": True}))


async def test_jwt_from_a_jwks_file(tmp_path: Path, make_registry: MakeRegistry) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [public | {"kid": "k1", "alg": "RS256", "use": "sig"}]}))
    registry = make_registry("fraud/1.0.0")
    auth = {"required": True, "jwks_file": str(jwks), "audience": "rollguard"}
    claims = {"sub": "svc", "exp": int(time.time()) + 60, "scope": "infer", "aud": "rollguard"}
    async with serve(tmp_path, registry, data_auth=auth) as server, aiohttp.ClientSession() as http:
        predict = f"{server.url}/predict/fraud"
        good = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})
        assert (await _status(http, predict, {"Authorization": f"Bearer {good}"}))[0] == 200
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        forged = jwt.encode(claims, other, algorithm="RS256", headers={"kid": "k1"})
        wrong_aud = jwt.encode(claims | {"aud": "x"}, key, algorithm="RS256", headers={"kid": "k1"})
        # An HS256 token "signed" with the public key (algorithm confusion) is refused too.
        confused = _hs256(claims, json.dumps(public).encode())
        for token in (forged, wrong_aud, confused):
            assert (await _status(http, predict, {"Authorization": f"Bearer {token}"}))[0] == 401


async def test_off_by_default(tmp_path: Path, make_registry: MakeRegistry) -> None:
    registry = make_registry("fraud/1.0.0")
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        assert server.running.data_plane.auth is None
        assert server.running.data_plane.limiter is None
        got = {(await _status(http, f"{server.url}/predict/fraud", {}))[0] for _ in range(50)}
        assert got == {200}
