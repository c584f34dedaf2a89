"""Label poisoning: nobody can roll a healthy candidate back with feedback they should not give.

A label reaches only a request of the model in the feedback URL, made by the same caller
(when authenticated); a repeated client-given id never takes over the entry of the
request that first had it; the feedback answer lists accepted ids and never says which
version served or whether it was right. With data-plane auth, labelling is a scope of its
own. Each test drives the real gateway over loopback; a decision is run right after the
attack (`Rollouts.tick`, what the policy loop calls every interval).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml

from rollguard.serving.demo.build import load_eval_data
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import Server, serve

X, Y = load_eval_data()
CANARY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: fraud}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "1.1.0"
  strategy: canary
  split: hash
  key: header:x-user-id
  steps:
    - {weight: 50, hold: 1h, min_requests: 1}
    - {weight: 100}
  interval: 0.2s
  checks:
    - {metric: accuracy, max_drop_vs_stable: 0.1, min_samples: 30, on_fail: rollback}
"""
KEYS = {  # name: (key, scopes)
    "app": ("app-key-0123456789abcdef", ["infer", "feedback"]),
    "mallory": ("mallory-key-0123456789ab", ["infer"]),
    "mallory-labels": ("mallory-labels-key-01234", ["feedback"]),
}
CANDIDATE = "1.1.0"


def _policies(tmp_path: Path) -> Path:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fraud.yaml").write_text(CANARY)
    return policies


def _keys_file(tmp_path: Path) -> Path:
    entries = [
        {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), "scopes": scopes}
        for name, (key, scopes) in KEYS.items()
    ]
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


def _as(name: str | None) -> dict[str, str]:
    return {} if name is None else {"Authorization": f"Bearer {KEYS[name][0]}"}


async def _predict(
    server: Server, http: aiohttp.ClientSession, row: int, user: str, rid: str, who: str | None
) -> tuple[str, int]:
    """(the version that answered, its predicted label) for one row of the eval set."""
    body = {"features": X[row].tolist(), "id": rid}
    headers = {"x-user-id": user} | _as(who)
    async with http.post(f"{server.url}/predict/fraud", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
        return resp.headers["x-rollguard-variant"], int(doc["predictions"]["label"])


async def _feedback(
    server: Server, http: aiohttp.ClientSession, labels: list[dict[str, Any]], who: str | None
) -> tuple[int, Any]:
    url = f"{server.url}/v2/models/fraud/feedback"
    async with http.post(url, json=labels, headers=_as(who)) as resp:
        return resp.status, await resp.json()


async def _legit_traffic(
    server: Server, http: aiohttp.ClientSession, n: int, who: str | None
) -> dict[str, int]:
    """`n` requests from random users, each labelled with its true label; labels per version."""
    labelled: dict[str, int] = {}
    labels = []
    for i in range(n):
        version, _ = await _predict(server, http, i % len(X), f"user-{i}", f"a-{i}", who)
        labelled[version] = labelled.get(version, 0) + 1
        labels.append({"id": f"a-{i}", "label": int(Y[i % len(X)])})
    status, doc = await _feedback(server, http, labels, who)
    assert status == 200 and len(doc["accepted"]) == n, doc
    return labelled


def _labelled(server: Server, version: str) -> int:
    return server.gateway.windows.get("fraud", version).evidence().labelled


def _phase(server: Server) -> str:
    return str(server.rollouts.describe("fraud")["phase"])


async def test_400_infers_and_one_feedback_call_do_not_roll_back_a_healthy_candidate(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """Mallory may infer but not label: she sends 400 requests onto the candidate (the
    variant header tells her which users land there), then labels every one of them wrong
    in one call, with her inference key and then with a feedback-only key; she also tries
    the app's ids. None of it lands; the candidate keeps progressing."""
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    auth = {"required": True, "api_keys_file": str(_keys_file(tmp_path))}
    async with (
        serve(tmp_path, registry, policies=_policies(tmp_path), data_auth=auth) as server,
        aiohttp.ClientSession() as http,
    ):
        honest = await _legit_traffic(server, http, 200, "app")
        assert honest.get(CANDIDATE, 0) >= 30 and honest.get("1.0.0", 0) >= 30
        wrong: list[dict[str, Any]] = []
        user = 0
        while len(wrong) < 400:
            users = range(user, user + 20)
            user += 20
            answers = await asyncio.gather(
                *(_predict(server, http, u % len(X), f"m-{u}", f"m-{u}", "mallory") for u in users)
            )
            wrong += [
                {"id": f"m-{u}", "label": 1 - predicted}
                for u, (version, predicted) in zip(users, answers, strict=True)
                if version == CANDIDATE
            ]
        wrong = wrong[:400]
        status, doc = await _feedback(server, http, wrong, "mallory")
        assert status == 403 and "'feedback'" in doc["error"]
        guessed = wrong + [{"id": f"a-{i}", "label": 0} for i in range(200)]
        status, doc = await _feedback(server, http, guessed, "mallory-labels")
        assert status == 200
        assert doc == {"accepted": [], "unknown": [g["id"] for g in guessed], "expired": []}
        assert _labelled(server, CANDIDATE) == honest[CANDIDATE]
        decision = server.rollouts.tick("fraud")
        assert _phase(server) == "progressing", decision["reason"]
        (accuracy,) = decision["checks"]
        assert accuracy["verdict"] != "fail", accuracy


async def test_a_repeated_id_never_takes_over_the_request_that_had_it_first(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """No auth at all: an attacker reuses the ids of the app's requests for requests of
    his own on the candidate, with rows the app's labels will call wrong. The labels
    still land on the app's requests, so nothing counts against the candidate."""
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    async with (
        serve(tmp_path, registry, policies=_policies(tmp_path)) as server,
        aiohttp.ClientSession() as http,
    ):
        honest = await _legit_traffic(server, http, 200, None)
        stable_rows: list[tuple[str, int]] = []  # the app's (id, row) the stable answered
        i = 0
        while len(stable_rows) < 100:
            version, _ = await _predict(server, http, i % len(X), f"user-{i}", f"o-{i}", None)
            if version == "1.0.0":
                stable_rows.append((f"o-{i}", i % len(X)))
            i += 1
        # The attacker's rows have the opposite true label of the app's rows.
        opposite = {y: int(np.flatnonzero(y != Y)[0]) for y in (0, 1)}
        taken = 0
        user = 0
        for rid, row in stable_rows:
            while True:
                user += 1
                version, _ = await _predict(
                    server, http, opposite[int(Y[row])], f"e-{user}", rid, None
                )
                if version == CANDIDATE:
                    taken += 1
                    break
        assert taken == 100
        labels = [{"id": rid, "label": int(Y[row])} for rid, row in stable_rows]
        status, doc = await _feedback(server, http, labels, None)
        assert status == 200 and doc == {
            "accepted": [rid for rid, _ in stable_rows],
            "unknown": [],
            "expired": [],
        }
        assert _labelled(server, "1.0.0") == honest["1.0.0"] + 100
        assert _labelled(server, CANDIDATE) == honest[CANDIDATE]
        decision = server.rollouts.tick("fraud")
        assert _phase(server) == "progressing", decision["reason"]


async def test_labels_for_another_models_requests_are_unknown(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "digits/1.0.0")
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        ids = []
        for _ in range(5):
            body = {"features": np.zeros(64).tolist()}
            async with http.post(f"{server.url}/predict/digits", json=body) as resp:
                assert resp.status == 200
                ids.append(resp.headers["x-request-id"])
        assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in ids)  # 128 random bits
        labels = [{"id": rid, "label": 3} for rid in ids]
        status, doc = await _feedback(server, http, labels, None)
        assert (status, doc) == (200, {"accepted": [], "unknown": ids, "expired": []})
        url = f"{server.url}/v2/models/fraud/feedback"
        async with http.post(url, json=labels[0]) as resp:
            assert resp.status == 404 and "model 'fraud'" in (await resp.json())["error"]
        digits = server.gateway.windows.get("digits", "1.0.0")
        assert digits.evidence().labelled == 0
        # Under its own model's URL each id takes one label; the answer says only which.
        async with http.post(f"{server.url}/v2/models/digits/feedback", json=labels) as resp:
            assert await resp.json() == {"accepted": ids, "unknown": [], "expired": []}
        async with http.post(f"{server.url}/v2/models/digits/feedback", json=labels[0]) as resp:
            assert resp.status == 404
        assert digits.evidence().labelled == 5
