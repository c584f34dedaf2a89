"""Fleet-wide evidence through Redis: published per process, expired when a process dies,
merged by the decider, and decided on as one process would decide the pooled traffic."""

from __future__ import annotations

import numpy as np
import redis.asyncio as aioredis

from rollguard.policy.checks import evaluate
from rollguard.policy.schema import Check
from rollguard.policy.summary import VariantSummary, fleet_evidence
from rollguard.policy.verdict import Verdict
from rollguard.proxy.fleet.evidence import FleetEvidence
from rollguard.proxy.windows import Outcome, VariantWindow
from tests.fleet.conftest import RedisServer
from tests.fleet.support import until

GENERATION, WEIGHT = 2, 5.0


def _window(version: str, latencies: list[float], errors: int = 0) -> VariantWindow:
    window = VariantWindow(version, 100)
    window.set_latency_threshold(0.1, 4)
    for i, latency in enumerate(latencies):
        window.count_routed()
        window.record(
            latency, Outcome.MODEL_ERROR if i < errors else Outcome.OK, rows=1 + i % 6, share=WEIGHT
        )
    return window


def _summaries(*windows: VariantWindow) -> list[VariantSummary]:
    return [VariantSummary.of(w.evidence(), generation=GENERATION, weight=WEIGHT) for w in windows]


async def test_the_decider_merges_every_live_process(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    processes = {
        f"pod-{i}": _summaries(
            _window("1", [0.01 * (i + 1)] * (10 + i), errors=i), _window("2", [0.2] * i, errors=1)
        )
        for i in range(3)
    }
    for name, summaries in processes.items():
        await FleetEvidence(client, redis_server.target, "shop", name).publish(
            summaries, interval_s=5
        )
    decider = FleetEvidence(client, redis_server.target, "shop", "pod-0")
    gathered = await decider.gather()
    assert sorted(gathered.summaries) == sorted(processes) and gathered.invalid == {}
    evidence = fleet_evidence(
        gathered.all(),
        stable="1",
        candidate="2",
        generation=GENERATION,
        weight=WEIGHT,
        threshold=(0.1, 4),
    )
    assert (evidence.stable.requests, evidence.stable.errors) == (33, 3)
    assert (evidence.candidate.requests, evidence.candidate.errors) == (3, 2)
    assert (evidence.stable.routed, evidence.candidate.routed) == (33, 3)
    # Of the candidate's three 0.2 s requests (slower than the frozen 0.1 s) two failed:
    # their time counts in the error rate only (proxy/windows.py Outcome).
    assert (evidence.candidate.since_threshold, evidence.candidate.over_threshold) == (1, 1)
    assert evidence.stable.latencies.size == 33 - 3  # the answers' latencies


async def test_a_dead_processs_summary_expires_and_a_damaged_one_is_left_out(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    live = FleetEvidence(client, redis_server.target, "shop", "live")
    dead = FleetEvidence(client, redis_server.target, "shop", "dead")
    await dead.publish(_summaries(_window("2", [0.05] * 7)), interval_s=0.1)  # then it dies
    await live.publish(_summaries(_window("2", [0.05] * 5)), interval_s=30)
    assert sorted((await live.gather()).summaries) == ["dead", "live"]

    async def only_live() -> bool:
        return sorted((await live.gather()).summaries) == ["live"]

    await until(only_live, 5)
    assert await client.smembers("rollguard:evidence:shop") == {b"live"}
    await client.hset("rollguard:evidence:shop:live", "2", b'{"version": "2"}')
    gathered = await live.gather()
    assert gathered.summaries == {} and "not a variant summary" in gathered.invalid["live"]
    await live.withdraw()
    assert await client.exists("rollguard:evidence:shop:live") == 0


async def test_a_canary_spread_over_three_processes_is_caught_on_the_merged_sample(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    """5 % canary, candidate errors 2x stable's: the fleet, merging three processes'
    summaries each look, fails it after exactly the candidate requests one process
    seeing all the traffic needs (the merged counts are the pooled counts)."""
    rng = np.random.default_rng(19)
    check = Check(metric="error_rate", max_increase_vs_stable=0.0)
    one = {"1": VariantWindow("1", 1000), "2": VariantWindow("2", 1000)}
    fleet = [{"1": VariantWindow("1", 1000), "2": VariantWindow("2", 1000)} for _ in range(3)]
    publishers = [FleetEvidence(client, redis_server.target, "shop", f"pod-{i}") for i in range(3)]
    caught: dict[str, int] = {}
    for look in range(400):
        for i in range(300):
            version = "2" if rng.random() < WEIGHT / 100 else "1"
            failed = rng.random() < (0.10 if version == "2" else 0.05)
            outcome = Outcome.MODEL_ERROR if failed else Outcome.OK
            for windows in (one, fleet[(look * 300 + i) % 3]):  # round-robin across pods
                windows[version].count_routed()
                windows[version].record(0.01, outcome, share=WEIGHT)
        for pod, windows in zip(publishers, fleet, strict=True):
            await pod.publish(_summaries(windows["1"], windows["2"]), interval_s=30)
        merged = fleet_evidence(
            (await publishers[0].gather()).all(),
            stable="1",
            candidate="2",
            generation=GENERATION,
            weight=WEIGHT,
            threshold=None,
        )
        single = fleet_evidence(
            _summaries(one["1"], one["2"]),
            stable="1",
            candidate="2",
            generation=GENERATION,
            weight=WEIGHT,
            threshold=None,
        )
        for who, evidence in (("fleet", merged), ("one", single)):
            if who not in caught and evaluate(check, evidence, alpha=0.05).verdict == Verdict.FAIL:
                caught[who] = evidence.candidate.requests
        if len(caught) == 2:
            break
    assert set(caught) == {"fleet", "one"}, "the regression was not caught in 120000 requests"
    assert caught["fleet"] <= caught["one"]
    assert sum(w["2"].requests for w in fleet) == caught["fleet"]
