"""Over loopback: requests are counted per weight for the conditional tests, and a
gateway restart continues the tests from the counts in the rollout's state (issue 16)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from rollguard.serving.demo.build import load_eval_data
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import Server, serve
from tests.serving.support import eventually

X, _ = load_eval_data()

CANARY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: fraud}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "1.1.0"
  key: header:x-user-id
  steps:
    - {weight: 20, hold: 1h}
    - {weight: 100}
  interval: 0.1s
  checks:
    - {metric: error_rate, max_increase_vs_stable: 0.01}
    - {metric: srm, on_fail: alert}
"""


async def _send(server: Server, http: aiohttp.ClientSession, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        body = {"features": X[i % len(X)].tolist()}
        headers = {"x-user-id": f"user-{seed}-{rng.integers(40)}"}  # 40 sticky users
        async with http.post(f"{server.url}/predict/fraud", json=body, headers=headers) as r:
            assert r.status == 200


def _error_check(server: Server, metric: str = "error_rate") -> dict[str, Any]:
    last = server.rollouts.describe("fraud")["last_decision"] or {"checks": []}
    found = [c for c in last["checks"] if c["metric"] == metric]
    return found[0] if found else {"detail": {}}


def _counted(server: Server) -> int:
    detail = _error_check(server)["detail"]
    return int(detail.get("n_stable") or 0) + int(detail.get("n_candidate") or 0)


async def test_a_restart_continues_the_counts_of_the_conditional_test(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fraud.yaml").write_text(CANARY)
    async with (
        serve(tmp_path, registry, policies=policies) as server,
        aiohttp.ClientSession() as http,
    ):
        await _send(server, http, 60, seed=1)
        await eventually(lambda: _counted(server) == 60)
        check = _error_check(server)
        assert check["detail"]["test"] == "conditional" and check["detail"]["strata"] == 1
        state = server.rollouts.describe("fraud")["state"]
        (stratum,) = state["seen"]["strata"]  # every request counted at weight 20
        assert stratum[0] == 20 and stratum[1][0] + stratum[2][0] == 60
        assert stratum[2][0] > 0  # the candidate took some of them
        # sample-ratio: the split's units are the users, each counted once
        srm = _error_check(server, "srm")["detail"]
        assert srm["unit"] == "first-seen keys"
        assert srm["units_stable"] + srm["units_candidate"] <= 40 < 60
        await eventually(
            lambda: (server.rollouts.store.load("fraud") or {})["seen"] == state["seen"]
        )
    async with (
        serve(tmp_path, registry, policies=policies) as server,
        aiohttp.ClientSession() as http,
    ):
        restored = server.rollouts.describe("fraud")["state"]
        assert restored["carried"] == state["seen"] and restored["seen"] is None
        await _send(server, http, 20, seed=2)
        # the test goes on from 60: the new process's 20 requests come on top
        await eventually(lambda: _counted(server) == 80)
