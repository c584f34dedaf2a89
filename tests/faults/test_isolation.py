"""Bulkheads: a hung or slow local version costs only its own capacity, over loopback.

The real gateway, real local models (tests/faults/models.py): a scikit-learn classifier
that hangs (it waits a minute in every predict, as a model blocked on a lock does), and
an ONNX classifier with a `Loop` whose trip count is read from its input (microseconds
for real rows, seconds for one whose first feature is a million). Each test drives
real traffic next to the fault and shows it stays where it belongs:

- a hung candidate in a 20 % canary: the stable answers everything, its window holds
  no error, and the relative error check fails the candidate (not "inconclusive"):
  rolled back, audited;
- a hung shadow with every copy mirrored: no client notices;
- hung pinned calls: every other model and version answers;
- a data-dependent slow model cheap enough to run inline: it runs on its threads, so
  its slow call ends in 504 at `request_timeout_s` and everyone else is answered in
  their usual time meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rollguard.serving.bulkhead import Lane
from rollguard.serving.scheduling import Scheduled
from tests.faults import models
from tests.faults.support import Tally, admin, get, metric, post, until, v2_body
from tests.proxy.support import Server, serve
from tests.serving.support import eventually, layers

X = models.rows()
TIMEOUT_S = 0.5  # request_timeout_s: a hung call is answered 504 after this

CANARY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: m}}
spec:
  model: m
  stable: "1"
  candidate: "2"
  key: header:x-user-id
  interval: 0.1s
  steps:
    - {{weight: 20, hold: 1h}}
    - {{weight: 100}}
  checks:
    - {{metric: error_rate, {bound}, min_samples: 20, on_fail: rollback}}
"""

SHADOW = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: m}
spec:
  model: m
  stable: "1"
  candidate: "2"
  strategy: shadow
  split: random
  interval: 1h
  steps:
    - {weight: 100}
  checks:
    - {metric: agreement, min: 0.95, min_samples: 1000000, on_fail: hold}
"""


def _sklearn(registry: Path, model: str, version: str, estimator: Any, stage: str) -> None:
    data = models.joblib_bytes(estimator)
    models.write_version(registry, model, version, "model.joblib", data, stage=stage)


def _onnx(registry: Path, model: str, proto: Any, **runtime: Any) -> None:
    data = models.onnx_bytes(proto)
    models.write_version(registry, model, "1", "model.onnx", data, runtime=runtime or None)


def _hung_pair(registry: Path) -> None:
    """m/1 a working production classifier, m/2 the same that hangs."""
    _sklearn(registry, "m", "1", models.logistic(), "production")
    _sklearn(registry, "m", "2", models.hanging(), "staging")


async def _workers(
    n: int, work: Callable[[int, int], Awaitable[None]], stop: asyncio.Event
) -> list[asyncio.Task[None]]:
    """`n` tasks calling `work(worker, i)` for i = 0, 1, ... until `stop` is set."""

    async def loop(w: int) -> None:
        i = 0
        while not stop.is_set():
            await work(w, i)
            i += 1

    return [asyncio.create_task(loop(w)) for w in range(n)]


@contextlib.asynccontextmanager
async def _running(n: int, work: Callable[[int, int], Awaitable[None]]) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = await _workers(n, work, stop)
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


@pytest.mark.slow
@pytest.mark.parametrize("bound", ["max_increase_vs_stable: 0.005", "max: 0.05"])
async def test_a_hung_candidate_fails_alone_and_is_rolled_back(tmp_path: Path, bound: str) -> None:
    registry = tmp_path / "registry"
    _hung_pair(registry)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "m.yaml").write_text(CANARY.format(bound=bound))
    tally = Tally()
    async with (
        serve(tmp_path, registry, policies=policies, request_timeout_s=TIMEOUT_S) as server,
        aiohttp.ClientSession() as http,
    ):
        url = f"{server.url}/v2/models/m/infer"

        async def client(w: int, i: int) -> None:
            headers = {"x-user-id": f"user-{w}-{i}"}
            await post(http, url, v2_body(X[(w + 8 * i) % len(X)][None]), tally, headers)

        async def rolled_back() -> bool:
            doc = await admin(server, http, "rollouts/m")
            return bool(doc["phase"] == "rolled_back")

        async with _running(8, client):
            await until(rolled_back, timeout_s=25)
            after = tally.of("1")
            await eventually(lambda: tally.of("1") >= after + 40)  # served on by stable
        doc = await admin(server, http, "rollouts/m")
        entries = (await admin(server, http, "audit?rollout=m"))["entries"]
    stable_ok = tally.of("1", 200) / tally.of("1")
    assert stable_ok >= 0.99, tally.by_variant
    assert tally.of("1") == tally.of("1", 200), tally.errors  # in fact: every one
    # The candidate failed its own requests only: 504 at its deadline, then 503 at once
    # while its threads are stuck.
    assert tally.of("2") > 0 and tally.of("2", 200) == 0
    assert set(tally.by_variant["2"]) <= {503, 504}, tally.by_variant
    assert doc["variants"]["stable"]["errors"] == 0
    candidate = doc["variants"]["candidate"]
    assert candidate["errors"] == candidate["requests"] > 0
    rollbacks = [
        e["data"]
        for e in entries
        if e["kind"] == "decision" and e["data"].get("action") == "rollback"
    ]
    assert len(rollbacks) == 1, entries
    (error_rate,) = (c for c in rollbacks[0]["checks"] if c["metric"] == "error_rate")
    assert error_rate["verdict"] == "fail", error_rate  # decided, not inconclusive


@pytest.mark.slow
async def test_a_slow_candidate_leaves_the_stables_latency_alone(tmp_path: Path) -> None:
    """The issue's 1 s candidate pushed the stable's latency to 4 s; now it queues on its
    own threads only."""
    registry = tmp_path / "registry"
    _sklearn(registry, "m", "1", models.logistic(), "production")
    _sklearn(registry, "m", "2", models.hanging(delay_s=0.1), "staging")  # 0.2 s a call
    policies = tmp_path / "policies"
    policies.mkdir()
    policy = CANARY.format(bound="max: 0.5").replace("weight: 20", "weight: 50")
    (policies / "m.yaml").write_text(policy)
    tally = Tally()
    async with (
        serve(tmp_path, registry, policies=policies) as server,
        aiohttp.ClientSession() as http,
    ):
        url = f"{server.url}/v2/models/m/infer"

        async def client(w: int, i: int) -> None:
            headers = {"x-user-id": f"user-{w}-{i}"}
            await post(http, url, v2_body(X[(w + 8 * i) % len(X)][None]), tally, headers)

        async with _running(8, client):
            await eventually(lambda: tally.of("2") >= 30 and tally.of("1") >= 100)
        variants = (await admin(server, http, "rollouts/m"))["variants"]
    assert tally.statuses == {200: tally.total}, tally.errors
    stable, candidate = variants["stable"], variants["candidate"]
    assert stable["errors"] == candidate["errors"] == 0
    # The stable's slowest requests are far faster than the candidate's typical one
    # (sharing its threads, the stable queued behind 0.2 s calls; a factor of 3 leaves
    # room for a loaded CI machine's own stalls, seen at 44 ms).
    assert stable["latency_p99"] < candidate["latency_p50"] / 3, (stable, candidate)


@pytest.mark.slow
async def test_a_hung_shadow_fails_no_client(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    _hung_pair(registry)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "m.yaml").write_text(SHADOW)
    tally = Tally()
    settings: dict[str, Any] = {"request_timeout_s": TIMEOUT_S, "shadow_budget": 1.0}
    async with (
        serve(tmp_path, registry, policies=policies, **settings) as server,
        aiohttp.ClientSession() as http,
    ):
        url = f"{server.url}/v2/models/m/infer"

        async def client(w: int, i: int) -> None:
            if tally.total < 200:
                await post(http, url, v2_body(X[(w + 4 * i) % len(X)][None]), tally)
            else:
                await asyncio.sleep(0.01)

        async with _running(4, client):
            await eventually(lambda: tally.total >= 200)

        async def all_copies_accounted() -> dict[str, float]:
            found = await _shadow_results(server, http)
            return found if sum(found.values()) >= tally.total else {}

        copies = await until(all_copies_accounted)
    assert tally.statuses == {200: tally.total}, tally.errors
    assert tally.of("1") == tally.total
    # Every copy went to the hung shadow (none shed or dropped) and none came back.
    assert sum(copies.values()) == tally.total
    assert set(copies) <= {"timeout", "error"} and copies.get("timeout", 0) >= 1, copies


def _scheduled(server: Server, model: str) -> Scheduled:
    """The scheduling layer of a model's version 1 (only to wait for its threads)."""
    runner = server.running.registry.get(model, "1").runner
    (found,) = (layer for layer in layers(runner) if isinstance(layer, Scheduled))
    return found


async def _shadow_results(server: Server, http: aiohttp.ClientSession) -> dict[str, float]:
    found: dict[str, float] = {}
    for labels, value in (await metric(server, http, "rollguard_shadow_requests_total")).items():
        parts = dict(part.split("=", 1) for part in labels.split(","))
        if parts["version"] == "2":
            found[parts["result"]] = value
    return found


@pytest.mark.slow
async def test_hung_pinned_calls_leave_other_models_and_versions_alone(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    _hung_pair(registry)
    _sklearn(registry, "a", "1", models.logistic(), "production")
    _onnx(registry, "b", models.onnx_model(models.logistic()))
    tally, pinned = Tally(), Tally()
    async with (
        serve(tmp_path, registry, request_timeout_s=TIMEOUT_S) as server,
        aiohttp.ClientSession() as http,
    ):
        others = [f"{server.url}/v2/models/{m}/infer" for m in ("m", "a", "b")]
        others.append(f"{server.url}/v2/models/m/versions/1/infer")
        hung = f"{server.url}/v2/models/m/versions/2/infer"

        async def client(w: int, i: int) -> None:
            await post(http, others[(w + i) % len(others)], v2_body(X[i % len(X)][None]), tally)

        async def hang(w: int, i: int) -> None:
            await post(http, hung, v2_body(X[w][None]), pinned)

        async with _running(4, client), _running(4, hang):
            await eventually(lambda: pinned.total >= 40 and tally.total >= 400)
    assert tally.statuses == {200: tally.total}, tally.errors
    assert pinned.of("2", 200) == 0 and set(pinned.statuses) <= {503, 504}, pinned.statuses
    assert pinned.statuses.get(504, 0) >= 1


@pytest.mark.slow
async def test_a_data_dependent_slow_model_stalls_no_one_and_keeps_its_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = tmp_path / "registry"
    loop_model = models.with_loop(models.onnx_model(models.logistic()))
    _onnx(registry, "loop", loop_model)
    _onnx(registry, "plain", models.onnx_model(models.logistic()))
    _sklearn(registry, "sk", "1", models.logistic(), "production")
    timeout_s = 1.0
    slow_row = X[:1].copy()  # a real row, but for its first feature: the Loop's trip count
    slow_row[0, 0] = 4 * timeout_s / models.seconds_per_trip(models.onnx_bytes(loop_model))
    # 10 ms: both ONNX models are measured far below it, so cost alone would put both
    # on the event loop; only the Loop keeps `loop` off it.
    settings: dict[str, Any] = {"request_timeout_s": timeout_s, "inline_below_us": 10_000}
    caplog.set_level(logging.INFO, logger="rollguard.serving.scheduling")
    async with serve(tmp_path, registry, **settings) as server, aiohttp.ClientSession() as http:
        urls = [f"{server.url}/v2/models/{m}/infer" for m in ("loop", "plain", "sk")]
        ready = f"{server.url}/v2/health/ready"

        async def measure(tally: Tally) -> None:
            for i in range(3):
                await post(http, urls[i], v2_body(X[1 + tally.total % 100][None]), tally)
            await get(http, ready, tally)

        warm_up, baseline, during, slow, after = Tally(), Tally(), Tally(), Tally(), Tally()
        while warm_up.total < 400:  # past the first measuring rounds: `plain` goes inline
            await measure(warm_up)
        while baseline.total < 200:
            await measure(baseline)
        slow_call = asyncio.create_task(post(http, urls[0], v2_body(slow_row), slow))
        while not slow_call.done():
            await measure(during)
        # The call computes on after its 504, on its own thread: wait for it to return
        # (ONNX Runtime must not be mid-call when the interpreter exits); then the
        # version answers as before.
        threads = _scheduled(server, "loop").threads[Lane.PRIMARY]
        await eventually(lambda: threads.stuck == 0)
        await post(http, urls[0], v2_body(X[:1]), after)
    assert warm_up.statuses == {200: 400} and baseline.statuses == {200: 200}, baseline.errors
    assert during.statuses == {200: during.total} and during.total >= 40, during.errors
    assert after.statuses == {200: 1}, after.errors
    assert slow.statuses == {504: 1}, slow.errors  # the deadline held: not a late 200
    assert f"did not answer within {timeout_s:g}s" in slow.errors[0]
    assert "loop/1 always runs on threads: its graph uses Loop" in caplog.text
    assert "plain/1 always runs on threads" not in caplog.text
    # Nobody waited behind the slow call (it computed 4 timeouts' worth): each answer
    # came in a fraction of the timeout, and the median as it was before (a generous
    # factor: the slow call takes one of the two cores meanwhile).
    assert max(during.latencies) < timeout_s / 2, max(during.latencies)
    normal, now = statistics.median(baseline.latencies), statistics.median(during.latencies)
    assert now < 10 * normal, (now, normal)
