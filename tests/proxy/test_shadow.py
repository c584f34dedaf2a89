"""ShadowMirror: bounded queue, and shedding to a budget while the gateway is busy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from rollguard.proxy.load import LoadGauge, host_busy_share, host_cpu_times
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.settings import Settings
from rollguard.proxy.shadow import ShadowMirror


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


def test_budget_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match="shadow budget must be within"):
        _mirror(Metrics(CollectorRegistry()), budget=1.5)


async def test_gauge_sees_a_saturated_loop_thread_then_an_idle_one(tmp_path: Path) -> None:
    # No host reading: a busy test machine must not be what the gauge sees here.
    gauge = LoadGauge(period_s=0.05, proc_stat=tmp_path / "absent")
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
        assert gauge.loop_share >= gauge.loop_busy
        # Idle now: the next samples see (almost) no CPU on the loop thread.
        while gauge.busy and time.monotonic() < end + 5:  # noqa: ASYNC110
            await asyncio.sleep(gauge.period_s)
        assert not gauge.busy and gauge.loop_share < gauge.loop_busy
    finally:
        gauge.stop()


def test_host_share_from_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal
    stat.write_text("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n")
    before = host_cpu_times(stat)
    stat.write_text("cpu  280 0 110 830 60 0 0 0 0 0\ncpu0 1 2 3 4\n")
    after = host_cpu_times(stat)
    assert before == (150.0, 1000.0) and after == (390.0, 1280.0)
    assert host_busy_share(before, after) == pytest.approx(240 / 280)
    assert host_cpu_times(tmp_path / "absent") is None
    stat.write_text("not a stat file\n")
    assert host_cpu_times(stat) is None
    real = host_cpu_times()  # this machine's, where there is one
    if real is not None:
        assert 0 <= real[0] <= real[1]


async def test_gauge_counts_a_saturated_host_as_busy(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  0 0 0 1000 0 0 0 0\n")
    gauge = LoadGauge(period_s=0.02, proc_stat=stat)
    gauge.start()
    try:
        ticks = 0
        while not gauge.busy:
            ticks += 1  # every 20 ms the "host" did 95 % busy work since the last sample
            stat.write_text(f"cpu  {95 * ticks} 0 0 {1000 + 5 * ticks} 0 0 0 0\n")
            await asyncio.sleep(gauge.period_s)
        assert gauge.host_share >= gauge.host_busy and gauge.loop_share < gauge.loop_busy
    finally:
        gauge.stop()
