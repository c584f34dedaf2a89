"""The admin port's /metrics, scraped from the real gateway over loopback: process
metrics, 503s of versions that cannot answer, check verdicts and statistics, and no
stale series once a rollout changes its candidate or goes away."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from rollguard.serving.demo.build import load_eval_data
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import Server, serve
from tests.serving.support import eventually

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

POLICY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: fraud}}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "{candidate}"
  key: header:x-user-id
  interval: 1h
  steps:
    - {{weight: 10, hold: 0s, min_requests: 50}}
    - {{weight: 100}}
  checks:
    - {{metric: error_rate, max: 0.01, min_samples: 300, on_fail: rollback}}
    - {{metric: srm, on_fail: alert}}
"""


async def scrape(server: Server) -> Samples:
    """Every sample of one /metrics scrape, by name and label set."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.admin_url}/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def named(samples: Samples, name: str) -> list[dict[str, str]]:
    """The label sets of every sample called `name`."""
    return [dict(labels) for n, labels in samples if n == name]


def row(i: int = 0) -> dict[str, object]:
    x, _ = load_eval_data()
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 30], "data": x[i].tolist()}
    return {"inputs": [tensor]}


async def test_process_and_runtime_metrics_are_on_rollguards_registry(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """CPU, resident memory, open file descriptors, the collector's work and the Python
    version: what the default registry would have, on the gateway's own."""
    async with serve(tmp_path, make_registry("fraud/1.0.0")) as server:
        samples = await scrape(server)
    assert (value(samples, "process_resident_memory_bytes") or 0) > 1_000_000
    assert (value(samples, "process_open_fds") or 0) > 3
    assert value(samples, "process_cpu_seconds_total") is not None
    assert value(samples, "process_max_fds") is not None
    assert any(g["generation"] == "0" for g in named(samples, "python_gc_collections_total"))
    assert named(samples, "python_info")


async def test_503s_of_a_version_that_cannot_answer_are_counted_by_why(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """A pinned request for a refused version and a routed request for a model with no
    production version are answered 503, each counted once with its reason; bad input for
    the refused version is a 400 counted nowhere."""
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    broken = registry / "fraud" / "9.9.9"
    broken.mkdir()
    (broken / "model.yaml").write_text(
        "name: fraud\nversion: '9.9.9'\nframework: onnx\nartifact: model.onnx\n"
        f"sha256: {'0' * 64}\nstage: staging\n"
    )
    (broken / "model.onnx").write_bytes(b"not the registered bytes")
    staging_only = make_registry("fraud-onnx/1.1.0")  # stage: staging, no default
    async with serve(tmp_path, staging_only) as server, aiohttp.ClientSession() as http:
        samples = await scrape(server)
        assert named(samples, "rollguard_unavailable_requests_total") == []
        for _ in range(2):
            async with http.post(f"{server.url}/v2/models/fraud-onnx/infer", json=row()) as r:
                assert r.status == 503
        samples = await scrape(server)
        assert (
            value(
                samples,
                "rollguard_unavailable_requests_total",
                model="fraud-onnx",
                version="",
                role="stable",
                reason="no_production",
            )
            == 2
        )
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        pinned = f"{server.url}/v2/models/fraud/versions/9.9.9/infer"
        for _ in range(3):
            async with http.post(pinned, json=row()) as r:
                assert r.status == 503
                assert "refused" in (await r.json())["error"]
        async with http.post(pinned, json={"inputs": "no"}) as r:
            assert r.status == 400
        async with http.post(f"{server.url}/v2/models/fraud/infer", json=row()) as r:
            assert r.status == 200
        samples = await scrape(server)
    labels = {"model": "fraud", "version": "9.9.9", "role": "pinned", "reason": "refused"}
    assert value(samples, "rollguard_unavailable_requests_total", **labels) == 3
    assert named(samples, "rollguard_unavailable_requests_total") == [labels]
    # The registry's own word on the refused version, read at scrape time.
    assert value(samples, "rollguard_registry_refused", model="fraud", version="9.9.9") == 1


async def test_check_verdicts_bounds_and_a_changed_candidate_leave_no_stale_series(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """Each check's verdict, bound and inconclusive reason are exported per rollout;
    the weight is a 0-1 ratio; a new candidate replaces the old one's series (its weight
    does not stay behind), and a removed rollout leaves none."""
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0", "fraud/1.4.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    policy = policies / "fraud.yaml"
    policy.write_text(POLICY.format(candidate="1.1.0"))
    async with serve(tmp_path, registry, policies=policies) as server:
        await eventually(lambda: server.gateway.router.table("fraud") is not None)
        server.rollouts.tick("fraud")
        samples = await scrape(server)
        split = {"model": "fraud", "rollout": "fraud", "stable": "1.0.0"}
        assert value(samples, "rollguard_candidate_weight_ratio", **split, candidate="1.1.0") == (
            0.1
        )
        assert not any(name.endswith("_percent") for name, _ in samples)
        first = {"rollout": "fraud", "check": "0", "metric": "error_rate"}
        verdict = "rollguard_check_verdict"
        assert value(samples, verdict, **first, verdict="inconclusive") == 1
        assert value(samples, verdict, **first, verdict="fail") == 0
        assert value(samples, verdict, **first, verdict="pass") == 0
        statistic = "rollguard_check_statistic"
        assert value(samples, statistic, **first, statistic="bound") == 0.01
        reason = "rollguard_check_inconclusive_reason"
        assert value(samples, reason, **first, reason="too_few_samples") == 1
        assert value(samples, reason, **first, reason="undecided") == 0
        srm = {"rollout": "fraud", "check": "1", "metric": "srm"}
        assert value(samples, verdict, **srm, verdict="inconclusive") == 1

        policy.write_text(POLICY.format(candidate="1.4.0"))
        server.rollouts.reload()
        samples = await scrape(server)
        weights = named(samples, "rollguard_candidate_weight_ratio")
        assert weights == [split | {"candidate": "1.4.0"}]
        # The old candidate's verdicts went with it; the new one has none until it is checked.
        assert named(samples, verdict) == []
        assert named(samples, statistic) == []
        server.rollouts.tick("fraud")
        samples = await scrape(server)
        assert value(samples, verdict, **first, verdict="inconclusive") == 1

        policy.unlink()
        server.rollouts.reload()
        samples = await scrape(server)
        for name in (
            "rollguard_candidate_weight_ratio",
            "rollguard_rollout_phase",
            "rollguard_rollout_candidate_unavailable",
            "rollguard_rollout_inconclusive",
            verdict,
            statistic,
            reason,
        ):
            assert named(samples, name) == [], name
