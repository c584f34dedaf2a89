"""Smoke tests of the open-loop and footprint modes of the side-by-side benchmark: they run
against real servers and report their figures (no speed is asserted)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from load_tests import bench_dataplane
from load_tests.bench import footprint, latency, models, openloop, report
from load_tests.bench.procs import Processes
from load_tests.bench.targets import Lab, Target
from load_tests.bench.tools import Tool

pytestmark = pytest.mark.slow


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    demo = models.build_demo(tmp_path, ("onnx",))
    with Processes(tmp_path / "logs") as procs:
        yield Lab(procs, tmp_path, demo, Tool("nginx", None, "not used"), install=False)


def test_open_loop_client_sends_at_a_fixed_rate_and_counts_answers(lab: Lab) -> None:
    _, base = lab.bare("a")
    result = openloop.run_url(
        base + f"/v2/models/{models.MODEL}/infer",
        models.request_body(),
        models.KEY_HEADER,
        rate=200,
        duration_s=1.0,
    )
    assert result.requests == 200 and result.errors == 0
    assert 0 < result.p50_ms <= result.p99_ms
    # Nothing listens there: every request is an error, none is lost silently.
    refused = openloop.run_url(
        "http://127.0.0.1:9/x", b"{}", models.KEY_HEADER, rate=50, duration_s=0.2
    )
    assert refused.requests == 0 and refused.errors == 10


def test_open_rounds_report_added_latency_and_what_a_shadow_mirrored(lab: Lab) -> None:
    started: list[Target] = lab.start(["bare", "rollguard", "rollguard-shadow"], print)
    assert not lab.skipped
    capacities = {"bare": 100.0, "rollguard": 60.0}
    # A short wait for a quiet host: what this test checks is the report, and the
    # suite's other work (a CI run saw a core busy for a minute) is not its business.
    runs = latency.open_rounds(
        started,
        capacities,
        rounds=1,
        duration_s=1.0,
        log=print,
        alive=lambda t: True,
        settle_s=2.0,
    )
    assert {(r.target, r.share, r.basis) for r in runs} == {
        (t, s, "bare") for t in ("bare", "rollguard", "rollguard-shadow") for s in latency.SHARES
    } | {("rollguard", 0.5, "rollguard"), ("rollguard-shadow", 0.5, "rollguard")}
    assert {r.rate for r in runs if r.basis == "rollguard"} == {30.0}  # half the twin's
    shadow = [r for r in runs if r.target == "rollguard-shadow"]
    assert all(0.0 <= r.figures["mirrored_share"] <= 1.0 for r in shadow)
    assert all(r.figures["compared_per_s"] >= 0 for r in shadow)
    docs = [
        {
            "target": r.target,
            "share": r.share,
            "rate": r.rate,
            "round": r.round,
            "figures": r.figures,
            "basis": r.basis,
        }
        for r in runs
    ]
    table = "\n".join(latency.table(docs))
    assert "| 50% | rollguard-shadow |" in table and "added p50 ms" in table
    assert table.count("| 50% | rollguard-shadow |") == 1  # the twin-based run is apart
    assert "| rollguard-shadow | 30 |" in "\n".join(latency.shadow_table(docs))
    rows = {"rollguard": report.Row("rollguard", ""), "rollguard-shadow": report.Row("x", "")}
    shown = latency.must_show(docs, rows)
    assert any("at 50 % of rollguard's capacity: mirrored" in line for line in shown)


def test_shadow_figures_from_counters() -> None:
    before = {"ok": 10.0, "shed": 5.0, "dropped": 0.0}
    after = {"ok": 100.0, "shed": 5.0, "dropped": 10.0, "error": 0.0}
    figures = latency.shadow_figures(before, after, primaries=100, duration_s=2.0)
    assert figures == {"mirrored_share": 90 / 100, "compared_per_s": 45.0}
    # nginx's mirror: only its upstream's answers are known; every primary was mirrored.
    nginx = latency.shadow_figures({"ok": 0.0}, {"ok": 50.0}, primaries=50, duration_s=1.0)
    assert nginx == {"mirrored_share": 1.0, "compared_per_s": 50.0}
    assert latency.shadow_figures(None, after, primaries=1, duration_s=1.0) == {}


def test_footprint_measures_both_gateways_and_the_install(lab: Lab, tmp_path: Path) -> None:
    _, upstream = lab.bare("a")
    found = footprint.measure(
        lab.procs, tmp_path, lab.demo, upstream, load_s=0, wrk_path=None, log=print, starts=1
    )
    for gateway in ("proxy_only", "demo_models"):
        assert found[gateway]["start_to_ready_s"] > 0
        assert found[gateway]["rss_idle_mib"] > 0
    install = found["install"]
    assert "rollguard" in install["proxy_only_distributions"]
    assert "onnxruntime" not in install["proxy_only_distributions"]
    assert "onnxruntime" in install["onnx_extra_distributions"]
    text = "\n".join(footprint.lines(found))
    assert "proxy-only RSS idle" in text and "start-to-ready" in text


def test_dataplane_micro_benchmark_runs(tmp_path: Path) -> None:
    found = uvloop.run(
        bench_dataplane.measure(
            tmp_path, requests_per_run=200, repeat=2, strategy="canary", profile=False
        )
    )
    assert 0 < found["least_us"] <= found["median_us"]


def test_nginx_mirror_at_half_its_twin_is_a_reference_not_a_goal() -> None:
    """The shadow goal's figures for nginx's mirror beside rollguard's: what the machine
    allows a proxy whose copies are second upstream calls, never judged met or not."""

    def run(target: str, p99: float) -> dict[str, object]:
        figures = {"p50_ms": 1.0, "p99_ms": p99, "errors": 0.0, "mirrored_share": 1.0}
        return {"target": target, "share": 0.5, "rate": 3000.0, "round": 1,
                "figures": figures, "basis": "nginx-proxy"}  # fmt: skip

    docs = [run("nginx-proxy", 2.0), run("nginx-mirror", 9.0)]
    assert "| nginx-mirror | 3,000 |" in "\n".join(latency.shadow_table(docs))
    shown = latency.must_show(docs, {})
    assert shown == [
        "- reference, not judged: nginx-mirror at 50 % of nginx-proxy's capacity: mirrored "
        "100.0% (goal >= 99 %), primary p99 4.50 x nginx-proxy's at that rate (goal <= 1.2)"
    ]
