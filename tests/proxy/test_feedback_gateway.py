"""Feedback through the real gateway: labels attributed by the request-id index, a label per
row of a batch, the index's bounds (410 for a forgotten request), and the accuracy check
holding while labels reach one arm more than the other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from rollguard.serving.demo.build import load_eval_data
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import Server, serve
from tests.serving.support import eventually

X, Y = load_eval_data()
CANARY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: fraud}}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "1.1.0"
  strategy: canary
  split: hash
  key: header:x-user-id
  steps:
    - {{weight: {weight}, hold: 1h, min_requests: 1}}
    - {{weight: 100}}
  window: 20
  interval: 1h
  checks:
    - {{metric: accuracy, max_drop_vs_stable: 0.1, min_samples: 30, on_fail: rollback}}
"""
SHADOW = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: fraud}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "1.1.0"
  strategy: shadow
  interval: 1h
  checks:
    - {metric: agreement, min: 0.5, min_samples: 1000, on_fail: hold}
"""


def _policies(tmp_path: Path, text: str) -> Path:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fraud.yaml").write_text(text)
    return policies


async def _predict(
    server: Server, http: aiohttp.ClientSession, rows: list[int], rid: str, user: str = "u"
) -> str:
    """One request of the eval set's `rows` (a batch when more than one); its variant."""
    return (await _answer(server, http, rows, rid, user))[0]


async def _answer(
    server: Server, http: aiohttp.ClientSession, rows: list[int], rid: str, user: str = "u"
) -> tuple[str, list[int]]:
    """One request of the eval set's `rows`: its variant and predicted label per row."""
    body: dict[str, Any] = {"id": rid}
    if len(rows) == 1:
        body["features"] = X[rows[0]].tolist()
    else:
        body["instances"] = [X[r].tolist() for r in rows]
    headers = {"x-user-id": user}
    async with http.post(f"{server.url}/predict/fraud", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        predictions = (await resp.json())["predictions"]
        listed = predictions if isinstance(predictions, list) else [predictions]
        return resp.headers["x-rollguard-variant"], [int(p["label"]) for p in listed]


async def _feedback(server: Server, http: aiohttp.ClientSession, doc: Any) -> tuple[int, Any]:
    async with http.post(f"{server.url}/v2/models/fraud/feedback", json=doc) as resp:
        return resp.status, await resp.json()


def _evidence(server: Server, version: str) -> Any:
    return server.gateway.windows.get("fraud", version).evidence()


async def test_late_labels_count_for_both_arms_whatever_their_windows_hold(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """Issue 16, problem 5: a window of 20 at a 10 % split wraps many times before the
    labels come; every label still counts, for the stable as for the candidate."""
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policies = _policies(tmp_path, CANARY.format(weight=10))
    async with (
        serve(tmp_path, registry, policies=policies) as server,
        aiohttp.ClientSession() as http,
    ):
        served: dict[str, list[int]] = {"1.0.0": [], "1.1.0": []}
        for i in range(300):
            version = await _predict(server, http, [i % len(X)], f"r{i}", f"user-{i}")
            served[version].append(i)
        assert len(served["1.1.0"]) >= 10 and len(served["1.0.0"]) > 200
        labels = [{"id": f"r{i}", "label": int(Y[i % len(X)])} for i in range(300)]
        status, doc = await _feedback(server, http, labels)
        assert status == 200 and len(doc["accepted"]) == 300, doc
        for version, rows in served.items():
            evidence = _evidence(server, version)
            assert evidence.labelled == evidence.labelled_requests == len(rows)
            assert evidence.labelled > 20  # more than its window holds


async def test_a_label_per_row_of_a_batch_and_a_wrong_count_is_a_400(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0")
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        rows = [0, 1, 2, 3, 4]
        _, predicted = await _answer(server, http, rows, "batch")
        _, one = await _answer(server, http, [5], "one")
        truth = [int(Y[r]) for r in rows]
        for wrong, count in ((truth[0], 1), (truth[:3], 3)):
            status, doc = await _feedback(server, http, {"id": "batch", "label": wrong})
            assert status == 400, doc
            assert "a list of 5 labels" in doc["error"] and f"got {count}" in doc["error"]
        # All or nothing: one bad count in a list applies no label at all.
        both = [{"id": "one", "label": int(Y[5])}, {"id": "batch", "label": [1, 0]}]
        status, doc = await _feedback(server, http, both)
        assert status == 400 and "feedback[1]" in doc["error"]
        assert _evidence(server, "1.0.0").labelled == 0
        # Numbers and class names mix: "1" confirms class 1.
        given = [str(t) if k % 2 else t for k, t in enumerate(truth)]
        status, doc = await _feedback(
            server, http, [{"id": "batch", "label": given}, {"id": "one", "label": [int(Y[5])]}]
        )
        assert status == 200 and doc == {"accepted": ["batch", "one"], "unknown": [], "expired": []}
        evidence = _evidence(server, "1.0.0")
        assert (evidence.labelled, evidence.labelled_requests) == (6, 2)
        assert evidence.correct == int(np.sum(np.array(predicted + one) == Y[[*rows, 5]]))


async def test_a_forgotten_request_is_answered_410_and_counted(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0")
    async with (
        serve(tmp_path, registry, feedback_capacity=100) as server,
        aiohttp.ClientSession() as http,
    ):
        for i in range(150):
            await _predict(server, http, [i % len(X)], f"e{i}")
        assert server.gateway.feedback_index.rows == 100
        status, doc = await _feedback(server, http, {"id": "e0", "label": 1})
        assert status == 410 and "feedback_capacity" in doc["error"]
        status, doc = await _feedback(server, http, {"id": "nope", "label": 1})
        assert status == 404
        items = [{"id": rid, "label": 1} for rid in ("e1", "e149", "nope")]
        status, doc = await _feedback(server, http, items)
        assert (status, doc) == (
            200,
            {"accepted": ["e149"], "unknown": ["nope"], "expired": ["e1"]},
        )
        async with http.get(f"{server.admin_url}/metrics") as resp:
            text = await resp.text()
        assert 'rollguard_feedback_expired_labels_total{model="fraud"} 2.0' in text


async def test_agreement_counts_every_row_of_a_batch(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policies = _policies(tmp_path, SHADOW)
    async with (
        serve(tmp_path, registry, policies=policies, shadow_budget=1.0) as server,
        aiohttp.ClientSession() as http,
    ):
        for i in range(5):
            await _predict(server, http, [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3], f"s{i}")
        await eventually(lambda: _evidence(server, "1.1.0").compared == 20)
        evidence = _evidence(server, "1.1.0")
        assert 15 <= evidence.agreed <= 20  # two good models agree on most rows


async def test_accuracy_holds_while_labels_reach_one_arm_more(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """Every stable request labelled, a quarter of the candidate's: the accuracy check
    says why it holds (status: /admin/rollouts/fraud) instead of passing on the labels it
    has; once the candidate's labels catch up, it decides again."""
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policies = _policies(tmp_path, CANARY.format(weight=50))
    async with (
        serve(tmp_path, registry, policies=policies) as server,
        aiohttp.ClientSession() as http,
    ):
        served: dict[str, list[int]] = {"1.0.0": [], "1.1.0": []}
        for i in range(400):
            version = await _predict(server, http, [i % len(X)], f"r{i}", f"user-{i}")
            served[version].append(i)
        late = served["1.1.0"][::4]
        first = [i for i in range(400) if i not in set(served["1.1.0"]) - set(late)]
        status, _ = await _feedback(server, http, [_truth(i) for i in first])
        assert status == 200
        (check,) = server.rollouts.tick("fraud")["checks"]
        assert check["verdict"] == "inconclusive", check
        assert check["detail"]["label_rates_differ"] == "yes"
        async with http.get(f"{server.admin_url}/admin/rollouts/fraud") as resp:
            shown = (await resp.json())["last_decision"]["checks"][0]["detail"]
        assert shown["reason"].startswith("held: labels reach 100.0% of the stable's")
        async with http.get(f"{server.admin_url}/metrics") as resp:
            text = await resp.text()
        reasons = [
            line
            for line in text.splitlines()
            if line.startswith("rollguard_check_inconclusive_reason{") and line.endswith(" 1.0")
        ]
        assert any('reason="label_rates_differ"' in line for line in reasons), reasons
        rest = [_truth(i) for i in served["1.1.0"] if i not in set(late)]
        status, _ = await _feedback(server, http, rest)
        assert status == 200
        (check,) = server.rollouts.tick("fraud")["checks"]
        assert check["detail"]["label_rates_differ"] == "no"
        assert not str(check["detail"]["reason"]).startswith("held")


def _truth(i: int) -> dict[str, Any]:
    return {"id": f"r{i}", "label": int(Y[i % len(X)])}
