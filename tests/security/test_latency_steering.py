"""Latency steering: huge batches sent onto the candidate do not roll back a healthy one.

A request's latency grows with its rows, so a client who learns (from the variant header)
which user keys land on the candidate could make it look slow by sending it 2,000-row
batches. Each record keeps its request's rows; with the latency threshold T the engine
freezes R, the stable's median request size, and counts only requests of at most R rows
on either variant (policy/checks.py `latency_rows`): the batches are served, and counted
for errors and accuracy, but are no evidence about latency either way.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import aiohttp
import orjson

from load_tests.bench.mlp import digits, train_onnx, write_version
from tests.proxy.support import Server, serve

X = digits()
CANDIDATE = "1.1.0"
BATCHES = 100  # 2,000-row batches sent onto the candidate
CANARY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: mlp}
spec:
  model: mlp
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
    - {metric: latency_p90, max_ratio_to_stable: 2, min_samples: 50, on_fail: rollback}
"""


def _registry(root: Path) -> Path:
    """An MLP whose cost grows with its rows (about 3 ms for one row, 35 ms for 2,000 on
    the 2-core CI box), as stable 1.0.0 and, the very same bytes, candidate 1.1.0."""
    onnx_bytes = train_onnx(hidden=512, layers=2)
    registry = root / "registry"
    write_version(registry / "mlp" / "1.0.0", onnx_bytes, name="mlp", version="1.0.0")
    candidate = registry / "mlp" / CANDIDATE
    write_version(candidate, onnx_bytes, name="mlp", version=CANDIDATE)
    manifest = candidate / "model.yaml"
    manifest.write_text(manifest.read_text().replace("stage: production", "stage: staging"))
    return registry


async def _single_rows(server: Server, http: aiohttp.ClientSession, users: range) -> list[str]:
    """One single-row request per user, 8 at a time; the versions that answered."""

    async def one(user: int) -> str:
        body = {"features": X[user % len(X)].tolist()}
        headers = {"x-user-id": f"user-{user}"}
        async with http.post(f"{server.url}/predict/mlp", json=body, headers=headers) as r:
            assert r.status == 200
            return r.headers["x-rollguard-variant"]

    versions: list[str] = []
    for start in range(users.start, users.stop, 8):
        batch = range(start, min(start + 8, users.stop))
        versions += await asyncio.gather(*(one(u) for u in batch))
    return versions


def _state(server: Server) -> dict[str, object]:
    return dict(server.rollouts.describe("mlp")["state"])


async def test_big_batches_onto_the_candidate_do_not_roll_it_back(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "mlp.yaml").write_text(CANARY)
    async with (
        serve(tmp_path, _registry(tmp_path), policies=policies) as server,
        aiohttp.ClientSession() as http,
    ):
        # Ordinary traffic until the engine freezes T (and R) from the stable's window.
        served = 0
        while _state(server)["latency_threshold"] is None:
            await _single_rows(server, http, range(served, served + 80))
            served += 80
            server.rollouts.tick("mlp")
            assert served < 2000, "no latency threshold frozen"
        assert _state(server)["latency_rows"] == 1  # the stable's typical request: one row
        # The attacker finds users on the candidate, then sends them 2,000-row batches.
        versions = await _single_rows(server, http, range(10_000, 10_100))
        targets = [10_000 + i for i, v in enumerate(versions) if v == CANDIDATE]
        assert len(targets) >= 20
        big = orjson.dumps({"instances": [X[i % len(X)].tolist() for i in range(2000)]})
        headers = {"Content-Type": "application/json"}
        for i in range(BATCHES):
            user = {"x-user-id": f"user-{targets[i % len(targets)]}"}
            url = f"{server.url}/predict/mlp"
            async with http.post(url, data=io.BytesIO(big), headers=headers | user) as r:
                assert r.status == 200
                assert r.headers["x-rollguard-variant"] == CANDIDATE
                assert len((await r.json())["predictions"]) == 2000
        # More ordinary traffic, so the candidate has the samples a verdict needs.
        await _single_rows(server, http, range(20_000, 20_200))
        decision = server.rollouts.tick("mlp")
        assert _state(server)["phase"] == "progressing", decision["reason"]
        (latency,) = decision["checks"]
        assert latency["verdict"] != "fail", latency
        detail = latency["detail"]
        assert detail["rows_counted_up_to"] == 1
        candidate = server.rollouts.describe("mlp")["variants"]["candidate"]
        # The batches were served and recorded, per request and per row.
        assert candidate["requests"] >= BATCHES + 100
        assert candidate["latency_p99"] > 2 * float(detail["threshold_s"])  # they are slow
        assert candidate["latency_per_row_p50"] is not None
        # Only the candidate's single-row requests were held against T, enough for a verdict.
        assert 50 <= int(detail["n_candidate"]) <= candidate["requests"] - BATCHES
