"""The load generator against a tiny real aiohttp server, and one scenario end to end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from load_tests.loadgen import (
    DROPPED,
    RatePhase,
    Workload,
    planned,
    run_closed,
    run_open,
    schedule,
)
from load_tests.run_scenario import main as run_scenario
from rollguard.serving.demo.build import build_demo_registry

SCENARIOS = Path(__file__).resolve().parents[2] / "load_tests" / "scenarios"
BODIES = [orjson.dumps({"row": i}) for i in range(10)]
LABELS = [float(10 * i) for i in range(10)]


@dataclass
class Tiny:
    """A server that answers like a gateway: a variant header, a request id, some 500s."""

    url: str = ""
    hold_s: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    users: list[str | None] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)
    labels: dict[str, float] = field(default_factory=dict)  # request id -> label
    rows: dict[str, int] = field(default_factory=dict)  # request id -> row
    inflight: int = 0
    peak: int = 0

    async def infer(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        self.users.append(request.headers.get("x-user-id"))
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            if self.hold_s:
                await asyncio.sleep(self.hold_s)  # a slow model
            row = int((await request.json())["row"])
        finally:
            self.inflight -= 1
        variant = "b" if row % 3 == 0 else "a"
        self.served[variant] = self.served.get(variant, 0) + 1
        request_id = f"req-{len(self.arrivals)}"
        self.rows[request_id] = row
        headers = {"x-rollguard-variant": variant, "x-request-id": request_id}
        status = 500 if row == 9 else 200  # row 9 always fails, on variant b
        return web.json_response({"row": row}, status=status, headers=headers)

    async def feedback(self, request: web.Request) -> web.Response:
        doc = await request.json()
        self.labels[doc["id"]] = doc["label"]
        return web.json_response({})


@contextlib.asynccontextmanager
async def tiny_server(hold_s: float = 0.0) -> AsyncIterator[Tiny]:
    tiny = Tiny(hold_s=hold_s)
    app = web.Application()
    app.router.add_post("/infer", tiny.infer)
    app.router.add_post("/feedback", tiny.feedback)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    tiny.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield tiny
    finally:
        await runner.cleanup()


def test_schedule_spaces_arrivals_evenly_phase_after_phase() -> None:
    phases = [RatePhase(10, 1.0), RatePhase(20, 0.5)]
    due = list(schedule(phases))
    assert planned(phases) == len(due) == 20
    assert due[:10] == pytest.approx([i / 10 for i in range(10)])
    assert due[10:] == pytest.approx([1.0 + i / 20 for i in range(10)])


async def test_open_loop_holds_the_arrival_rate() -> None:
    async with tiny_server() as tiny:
        result = await run_open(Workload(f"{tiny.url}/infer", BODIES), [RatePhase(200, 1.5)])
    assert len(result.records) == len(tiny.arrivals) == 300
    first = tiny.arrivals[0]
    in_first_second = sum(1 for t in tiny.arrivals if t - first < 1.0)
    assert 150 <= in_first_second <= 250  # 200 requests/s, within 25 %
    assert [r.scheduled for r in result.records] == pytest.approx([i / 200 for i in range(300)])


async def test_latency_from_schedule_is_never_below_latency_from_send() -> None:
    async with tiny_server(hold_s=0.02) as tiny:
        result = await run_open(Workload(f"{tiny.url}/infer", BODIES), [RatePhase(100, 0.5)])
    answered = [r for r in result.records if r.status > 0]
    assert len(answered) == 50
    for r in answered:
        assert r.start >= r.scheduled
        assert r.latency_from_schedule >= r.latency_from_send > 0


async def test_beyond_max_inflight_arrivals_are_dropped_not_delayed() -> None:
    # Every answer takes 2 s, far longer than the 0.5 s schedule: the first five arrivals
    # fill the bound, and every later one must be dropped at its due time.
    async with tiny_server(hold_s=2.0) as tiny:
        result = await run_open(
            Workload(f"{tiny.url}/infer", BODIES), [RatePhase(100, 0.5)], max_inflight=5
        )
    assert len(tiny.arrivals) == 5 and tiny.peak == 5
    sent = [r for r in result.records if r.status != DROPPED]
    dropped = [r for r in result.records if r.status == DROPPED]
    assert [r.scheduled for r in sent] == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])
    assert all(r.status == 200 for r in sent)
    assert len(dropped) == 45 and all(math.isnan(r.start) for r in dropped)
    assert result.peak_inflight == 5


async def test_variants_sticky_users_and_delayed_labels_are_recorded() -> None:
    async with tiny_server() as tiny:
        workload = Workload(
            f"{tiny.url}/infer",
            BODIES,
            labels=LABELS,
            users=7,
            feedback_url=f"{tiny.url}/feedback",
            feedback_delay_s=0.05,
        )
        result = await run_open(workload, [RatePhase(200, 0.5)])
    recorded: dict[str, int] = {}
    for r in result.records:
        assert r.variant is not None
        recorded[r.variant] = recorded.get(r.variant, 0) + 1
    assert recorded == tiny.served and set(recorded) == {"a", "b"}
    assert sum(r.status == 500 for r in result.records) == 10  # row 9 of every ten
    assert set(tiny.users) <= {f"user-{k}" for k in range(7)} and len(set(tiny.users)) > 1
    # Each successful answer got its own row's true label, and no failed one did.
    assert result.feedback_sent == result.feedback_ok == len(tiny.labels) == 90
    assert all(label == LABELS[tiny.rows[rid]] for rid, label in tiny.labels.items())


async def test_closed_loop_keeps_n_connections_busy() -> None:
    async with tiny_server(hold_s=0.01) as tiny:
        result = await run_closed(
            Workload(f"{tiny.url}/infer", BODIES), connections=3, duration_s=0.5
        )
    assert tiny.peak <= 3 and result.peak_inflight <= 3
    assert len(result.records) == len(tiny.arrivals) > 3
    assert all(r.start == r.scheduled for r in result.records)


async def test_load_goes_to_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        await run_open(Workload("http://192.0.2.1:80/infer", BODIES), [RatePhase(1, 1)])


@pytest.mark.slow
def test_bad_canary_scenario_is_rolled_back_end_to_end(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    build_demo_registry(registry, frameworks=["sklearn"])
    out = tmp_path / "out"
    argv = [str(SCENARIOS / "canary-bad-candidate.yaml"), "--quick", "--registry", str(registry)]
    status = run_scenario([*argv, "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert status == 0, report["failures"]
    assert report["rollout"]["phase"] == "rolled_back" and report["passed"]
    assert any(d["action"] == "rollback" for d in report["decisions"])
    assert report["variants"]["1.2.0"]["errors"] > 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
