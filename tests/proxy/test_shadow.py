"""ShadowMirror: bounded queue, and shedding to a budget only under the gateway's own CPU
pressure (its loop thread, process or cgroup quota; never the host's)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from rollguard.proxy.load import LoadGauge, own_cgroup
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.settings import Settings
from rollguard.proxy.shadow import Held, ShadowMirror
from rollguard.serving.bulkhead import Lane, current_lane
from rollguard.serving.errors import ModelExecutionError
from tests.serving.support import eventually


def _mirror(metrics: Metrics, **options: Any) -> ShadowMirror:
    """A mirror with the shipped settings' values unless the test says otherwise."""
    settings = Settings()
    defaults: dict[str, Any] = {
        "concurrency": settings.shadow_concurrency,
        "queue": settings.shadow_queue,
        "timeout_s": settings.shadow_timeout_s,
        "budget": settings.shadow_budget,
        "gauge": None,
    }
    return ShadowMirror(metrics, **{**defaults, **options})


def _shadow_count(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "rollguard_shadow_requests_total", {"model": "m", "version": "2", "result": result}
    )
    return value or 0.0


async def _submit(mirror: ShadowMirror, n: int) -> tuple[int, int]:
    ran = 0

    async def run() -> None:
        nonlocal ran
        ran += 1

    admitted = 0
    for _ in range(n):  # as the gateway does: admit before the primary, then start
        if mirror.admit("m", "2"):
            mirror.start(run)
            admitted += 1
    await mirror.drain()
    return admitted, ran


async def test_busy_gateway_admits_only_the_budget_and_counts_the_rest() -> None:
    metrics = Metrics(CollectorRegistry())
    gauge = LoadGauge()
    gauge.busy = True  # as the sampler sets it when the loop thread is saturated
    mirror = _mirror(metrics, queue=10_000, budget=0.1, gauge=gauge)
    admitted, ran = await _submit(mirror, 1000)
    assert admitted == ran == 100  # one copy per ten primaries, spread evenly
    assert mirror.shed == 900 and _shadow_count(metrics, "shed") == 900
    assert _shadow_count(metrics, "dropped") == 0


@examples(max_examples=60, deadline=None)
@given(budget=st.integers(0, 100).map(lambda p: p / 100), n=st.integers(1, 2000))
def test_under_pressure_the_budget_is_the_share_admitted(budget: float, n: int) -> None:
    """Any budget, not only those dividing one: 0.75 admits three copies in four (a
    credit capped at one copy admitted one in two)."""
    gauge = LoadGauge()
    gauge.busy = True
    mirror = _mirror(Metrics(CollectorRegistry()), queue=10_000, budget=budget, gauge=gauge)
    admitted = sum(mirror.admit("m", "2") for _ in range(n))
    assert abs(admitted - budget * n) <= 1
    assert mirror.shed == n - admitted


async def test_idle_gateway_or_full_budget_mirrors_everything() -> None:
    metrics = Metrics(CollectorRegistry())
    idle = LoadGauge()
    busy = LoadGauge()
    busy.busy = True
    for mirror in (
        _mirror(metrics, queue=10_000, budget=0.1, gauge=idle),
        _mirror(metrics, queue=10_000, budget=1.0, gauge=busy),
        _mirror(metrics, queue=10_000, budget=0.0),  # no gauge: never shed for load
    ):
        assert await _submit(mirror, 500) == (500, 500)
        assert mirror.shed == 0


async def test_full_queue_drops_even_when_idle() -> None:
    metrics = Metrics(CollectorRegistry())
    mirror = _mirror(metrics, concurrency=1, queue=4)
    admitted, ran = await _submit(mirror, 20)
    assert admitted == ran == 5
    assert mirror.dropped == 15 and _shadow_count(metrics, "dropped") == 15


async def test_copies_run_in_the_shadow_lane_at_most_concurrency_at_once() -> None:
    mirror = _mirror(Metrics(CollectorRegistry()), concurrency=3, queue=100)
    gate = asyncio.Event()
    lanes: list[Lane] = []
    running = most = 0

    async def run() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        lanes.append(current_lane())
        await gate.wait()
        running -= 1

    for _ in range(20):
        assert mirror.admit("m", "2")
        mirror.start(run)
    await eventually(lambda: running == 3)
    assert mirror.pending == 20  # 3 running, 17 waiting for a worker
    gate.set()
    await eventually(lambda: mirror.pending == 0)
    await mirror.drain()
    assert most == 3 and lanes == [Lane.SHADOW] * 20


async def test_the_loop_runs_between_two_copies() -> None:
    mirror = _mirror(Metrics(CollectorRegistry()), concurrency=1, queue=100)
    order: list[object] = []

    def copy(i: int) -> Any:
        async def run() -> None:
            order.append(i)  # a copy that never waits (an inline model)

        return run

    for i in range(4):
        assert mirror.admit("m", "2")
        mirror.start(copy(i))
    asyncio.get_running_loop().call_soon(order.append, "other work")
    await eventually(lambda: len(order) == 5)
    assert order == [0, "other work", 1, 2, 3]  # not four copies in one stretch
    await mirror.drain()


async def test_a_copy_past_its_time_limit_times_out_and_its_worker_runs_the_next() -> None:
    mirror = _mirror(Metrics(CollectorRegistry()), concurrency=1, timeout_s=0.2)
    outcomes: list[str] = []

    async def hung() -> None:
        try:
            async with mirror.deadline():
                await asyncio.Event().wait()  # a shadow call that never answers
        except TimeoutError:
            outcomes.append("timeout")

    async def answered() -> None:
        async with mirror.deadline():
            await asyncio.sleep(0)
        outcomes.append("ok")

    async def broken() -> None:
        raise RuntimeError("a bug in the copy itself")

    for run in (hung, broken, answered):
        assert mirror.admit("m", "2")
        mirror.start(run)
    started = time.monotonic()
    await eventually(lambda: outcomes == ["timeout", "ok"])
    assert time.monotonic() - started < 10  # the limit and a watchdog period, not forever
    assert mirror.pending == 0
    await mirror.drain()


async def test_a_copy_cancelled_from_outside_is_not_a_timeout() -> None:
    mirror = _mirror(Metrics(CollectorRegistry()), timeout_s=60.0)
    outcomes: list[str] = []
    entered = asyncio.Event()

    async def hung() -> None:
        try:
            async with mirror.deadline():
                entered.set()
                await asyncio.Event().wait()
        except TimeoutError:
            outcomes.append("timeout")
        except asyncio.CancelledError:
            outcomes.append("cancelled")
            raise

    assert mirror.admit("m", "2")
    mirror.start(hung)
    await asyncio.wait_for(entered.wait(), 20)
    await mirror.drain(wait_s=0.05)  # shutdown: what is left is cancelled
    assert outcomes == ["cancelled"] and mirror.pending == 0


def test_budget_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match="shadow budget must be within"):
        _mirror(Metrics(CollectorRegistry()), budget=1.5)


async def test_gauge_sees_a_saturated_loop_thread_then_an_idle_one() -> None:
    # No cgroup signal: only the loop thread's own CPU time is what the gauge sees here.
    # A threshold of one half: on a shared test machine a spinning thread may not get
    # 90 % of a core by the wall clock.
    gauge = LoadGauge(period_s=0.05, cgroup=None, threshold=0.5)
    gauge.start()
    try:
        loop = asyncio.get_running_loop()
        seen_busy = asyncio.Event()
        end = time.monotonic() + 5.0

        def spin() -> None:
            # 20 ms of pure CPU per callback, back to back: the loop thread is saturated.
            stop = time.thread_time() + 0.02
            while time.thread_time() < stop:
                pass
            if gauge.busy:
                seen_busy.set()
            elif time.monotonic() < end:
                loop.call_soon(spin)

        loop.call_soon(spin)
        await asyncio.wait_for(seen_busy.wait(), 10)
        assert gauge.shares["event_loop"] >= gauge.threshold
        # Idle now: the next samples see (almost) no CPU on the loop thread.
        while gauge.busy and time.monotonic() < end + 5:  # noqa: ASYNC110
            await asyncio.sleep(gauge.period_s)
        assert not gauge.busy and gauge.shares["event_loop"] < gauge.threshold
    finally:
        gauge.stop()


def _v2_cgroup(tmp_path: Path, cpu_max: str) -> tuple[Path, Path]:
    """/proc/self/cgroup and a cgroup v2 root with this process in /pod/sidecar."""
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/pod/sidecar\n")
    directory = tmp_path / "cg" / "pod" / "sidecar"
    directory.mkdir(parents=True)
    (directory / "cpu.max").write_text(cpu_max)
    (directory / "cpu.stat").write_text("usage_usec 0\nnr_periods 0\nnr_throttled 0\n")
    return proc, tmp_path / "cg"


def test_own_cgroup_is_found_v2_then_v1_and_never_the_root(tmp_path: Path) -> None:
    proc, root = _v2_cgroup(tmp_path, "50000 100000\n")
    found = own_cgroup(proc, root)
    assert found is not None and found.v2 and found.cores() == 0.5
    assert found.read() == (0.0, 0)
    (root / "pod" / "sidecar" / "cpu.max").write_text("max 100000\n")
    assert found.cores() is None  # no quota: nothing to run into
    # The root cgroup is the whole host (a plain VM): not the gateway's own.
    proc.write_text("0::/\n")
    assert own_cgroup(proc, root) is None
    # cgroup v1 only: cpu,cpuacct mounted together.
    proc.write_text("4:memory:/x\n3:cpu,cpuacct:/pod/sidecar\n")
    v1 = root / "cpu,cpuacct" / "pod" / "sidecar"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpuacct.usage").write_text("2500000000\n")
    (v1 / "cpu.stat").write_text("nr_periods 9\nnr_throttled 2\nthrottled_time 5\n")
    found = own_cgroup(proc, root)
    assert found is not None and not found.v2 and found.cores() == 1.5
    assert found.read() == (2.5, 2)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert found.cores() is None
    assert own_cgroup(tmp_path / "absent", root) is None


async def test_gauge_counts_its_cgroup_quota_and_throttling_as_pressure(tmp_path: Path) -> None:
    proc, root = _v2_cgroup(tmp_path, "50000 100000\n")  # half a core
    quota = own_cgroup(proc, root)
    assert quota is not None
    stat = root / "pod" / "sidecar" / "cpu.stat"
    gauge = LoadGauge(period_s=0.02, cgroup=quota)
    gauge.start()
    try:
        used = 0.0
        start = time.monotonic()
        while not gauge.busy:  # the cgroup uses all of its half core, as the clock runs
            assert time.monotonic() - start < 10
            used = (time.monotonic() - start) * 0.5
            stat.write_text(f"usage_usec {int(used * 1e6)}\nnr_throttled 0\n")
            await asyncio.sleep(gauge.period_s / 4)
        assert gauge.shares["cgroup"] >= gauge.threshold
        assert gauge.shares["event_loop"] < gauge.threshold
        # Light use, but the kernel throttled it within a period: pressure all the same.
        stat.write_text(f"usage_usec {int(used * 1e6)}\nnr_throttled 1\n")
        while gauge.shares["cgroup"] < 1.0:
            assert time.monotonic() - start < 10
            await asyncio.sleep(gauge.period_s)
        assert gauge.busy
    finally:
        gauge.stop()


def test_a_busy_host_is_not_the_gateways_pressure(tmp_path: Path) -> None:
    # The machine running these tests may well be busy: in the root cgroup, without a
    # quota of its own, the gauge has no cgroup signal at all.
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/\n2:cpu,cpuacct:/\n")
    assert own_cgroup(proc, tmp_path) is None
    assert LoadGauge(cgroup=None).shares["cgroup"] == 0.0


async def test_mirrored_share_and_the_shed_decision_are_exported() -> None:
    metrics = Metrics(CollectorRegistry())
    gauge = LoadGauge(cgroup=None, threshold=0.8)
    mirror = _mirror(metrics, queue=10_000, budget=0.25, gauge=gauge)
    assert await _submit(mirror, 100) == (100, 100)  # no pressure: every copy
    gauge.busy = True  # as the sampler sets it under pressure
    admitted, _ = await _submit(mirror, 100)
    assert admitted == 25
    sample = metrics.registry.get_sample_value
    assert sample("rollguard_shadow_mirrored_ratio", {"model": "m", "version": "2"}) == 125 / 200
    assert mirror.mirrored_share("m", "2") == 125 / 200
    assert mirror.mirrored_share("m", "other") == 1.0
    assert sample("rollguard_shadow_shedding") == 1.0
    assert sample("rollguard_shadow_pressure_threshold_ratio") == 0.8
    assert sample("rollguard_shadow_budget_ratio") == 0.25
    assert sample("rollguard_shadow_pressure_ratio", {"signal": "cgroup"}) == 0.0


async def test_a_copy_at_hand_completes_in_a_callback_after_the_request_in_the_shadow_lane() -> (
    None
):
    """`soon`: a copy whose answer is at hand (an inline version) runs as a plain callback
    once the current step is done, in the shadow lane; one that must be awaited goes to a
    worker; a bug in either is logged and the copy is settled; drain waits for them all."""
    mirror = _mirror(Metrics(CollectorRegistry()), concurrency=1, queue=4)
    order: list[object] = []
    lanes: list[Lane] = []

    def at_hand(i: int) -> Any:
        def now() -> bool:
            lanes.append(current_lane())
            order.append(i)
            return True

        return now

    def deferred(i: int) -> tuple[Any, Any]:
        def now() -> bool:
            return False

        async def run() -> None:
            lanes.append(current_lane())
            order.append(f"awaited {i}")

        return now, run

    async def never() -> None:
        raise AssertionError("a copy completed now is never awaited")

    def broken() -> bool:
        raise RuntimeError("a bug in the copy itself")

    assert mirror.admit("m", "2")
    mirror.soon(at_hand(0), never)
    assert mirror.admit("m", "2")
    mirror.soon(*deferred(1))
    assert mirror.admit("m", "2")
    mirror.soon(broken, never)
    assert mirror.admit("m", "2")
    mirror.soon(at_hand(2), never)
    order.append("the request's own step")
    assert mirror.pending == 4
    await mirror.drain()
    assert order == ["the request's own step", 0, 2, "awaited 1"]
    assert lanes == [Lane.SHADOW] * 3 and mirror.pending == 0


async def test_copies_waiting_for_their_callback_count_against_the_queue() -> None:
    mirror = _mirror(Metrics(CollectorRegistry()), concurrency=1, queue=2)
    for _ in range(3):
        assert mirror.admit("m", "2")
        mirror.soon(lambda: True, _never_awaited)
    assert not mirror.admit("m", "2") and mirror.dropped == 1
    await mirror.drain()
    assert mirror.pending == 0 and mirror.admit("m", "2")


async def _never_awaited() -> None:
    raise AssertionError("a copy completed now is never awaited")


class _Batching:
    """A runner whose calls batch on the loop, as far as `hold` needs one: it records each
    `predict_now_many` and its lane; `later` requests must be awaited after all, `failing`
    ones fail; `broken` raises out of the call itself."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.lanes: list[Lane] = []
        self.later: set[int] = set()
        self.failing: set[int] = set()
        self.broken = False

    def predict_now_many(self, requests: list[Any]) -> list[tuple[Any, float]]:
        self.lanes.append(current_lane())
        if self.broken:
            raise RuntimeError("a bug in the shared call")
        self.calls.append(list(requests))
        return [
            (None, 0.0)
            if r in self.later
            else (ModelExecutionError("no"), 0.5)
            if r in self.failing
            else (f"answer {r}", 0.25)
            for r in requests
        ]


def _held(runner: _Batching, request: int, seen: list[tuple[str, object, float]]) -> Held:
    async def run() -> None:
        seen.append(("awaited", request, 0.0))

    return Held(
        runner,  # type: ignore[arg-type]
        request,  # type: ignore[arg-type]
        lambda seconds, answer: seen.append(("answered", answer, seconds)),
        lambda seconds: seen.append(("failed", request, seconds)),
        run,
    )


async def test_held_copies_are_answered_together_after_the_hold_or_once_enough_are_held() -> None:
    """`hold`: copies of a version that batches on the loop wait up to HOLD_S, or until
    HOLD_COPIES are held, then each version's held copies go to it in one
    `predict_now_many`, in the shadow lane; one it cannot answer now is awaited on a
    worker, one it failed on counts as failed; they are pending until answered."""
    mirror = _mirror(Metrics(CollectorRegistry()), concurrency=1, queue=64)
    one, other = _Batching(), _Batching()
    one.later, one.failing = {2}, {3}
    seen: list[tuple[str, object, float]] = []
    for request in range(5):
        assert mirror.admit("m", "2")
        mirror.hold(_held(one if request != 1 else other, request, seen))
    assert mirror.pending == 5 and not seen
    await eventually(lambda: not mirror.pending)
    assert one.calls == [[0, 2, 3, 4]] and other.calls == [[1]]
    assert one.lanes == other.lanes == [Lane.SHADOW]
    assert sorted(seen, key=str) == sorted(
        [
            ("answered", "answer 0", 0.25),
            ("answered", "answer 1", 0.25),
            ("awaited", 2, 0.0),
            ("failed", 3, 0.5),
            ("answered", "answer 4", 0.25),
        ],
        key=str,
    )

    # HOLD_COPIES held: answered at the loop's next turn, not after the hold.
    one.calls.clear()
    mirror.HOLD_S = 3600.0
    for request in range(10, 10 + mirror.HOLD_COPIES):
        assert mirror.admit("m", "2")
        mirror.hold(_held(one, request, seen))
    await eventually(lambda: not mirror.pending)
    assert one.calls == [list(range(10, 10 + mirror.HOLD_COPIES))]


async def test_a_bug_in_the_shared_call_sends_each_held_copy_to_a_worker() -> None:
    mirror = _mirror(Metrics(CollectorRegistry()), concurrency=1, queue=8)
    runner = _Batching()
    runner.broken = True
    seen: list[tuple[str, object, float]] = []
    for request in range(3):
        assert mirror.admit("m", "2")
        mirror.hold(_held(runner, request, seen))
    await mirror.drain()
    assert sorted(seen, key=str) == [("awaited", r, 0.0) for r in range(3)]
    assert mirror.pending == 0


async def test_held_copies_count_against_the_queue_and_drain_waits_for_them() -> None:
    mirror = _mirror(Metrics(CollectorRegistry()), concurrency=1, queue=1)
    runner = _Batching()
    seen: list[tuple[str, object, float]] = []
    for request in range(2):
        assert mirror.admit("m", "2")
        mirror.hold(_held(runner, request, seen))
    assert not mirror.admit("m", "2") and mirror.dropped == 1
    await mirror.drain()
    assert len(seen) == 2 and mirror.pending == 0
