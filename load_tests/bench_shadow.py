"""Benchmark: a 200 ms shadow must not move the client's p99 (issue 3), at a fixed arrival rate.

Run: `python -m load_tests.bench_shadow` (about two minutes). Two rollguard gateways serve
the same registry: fraud-onnx 1.0.0 in-process (ONNX) and 1.1.0 as an `http` version
whose upstream sleeps 200 ms before answering. One gateway has a shadow rollout
mirroring every request to 1.1.0, the other none. An open-loop client sends the same
arrival rate to each (latency counted from each request's scheduled start, so queueing
cannot hide), in interleaved rounds. It prints the client's p50/p99 with shadow off
and on, their ratio (the goal: p99 within 10 %), and the shadow copies' results from
the admin port's /metrics (`rollguard_shadow_requests_total`: ok, error, timeout,
dropped, shed). Writes load_tests/results/shadow.md. Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from load_tests.bench import client, models
from load_tests.bench.procs import Process, Processes, free_port
from load_tests.bench.report import machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "load_tests" / "results"
_SHADOW = re.compile(r"rollguard_shadow_requests_total\{([^}]*)\} (\S+)")


def build_registry(demo: Path, work: Path, slow_base: str) -> Path:
    """1.0.0 in-process ONNX (linked from the demo), 1.1.0 `http` in front of the slow upstream."""
    registry = models.http_registry(demo, work, "registry-shadow", {models.CANDIDATE: slow_base})
    link = registry / models.MODEL / models.STABLE
    if not link.exists():
        link.symlink_to(demo / models.MODEL / models.STABLE)
    return registry


def start_gateway(
    procs: Processes, work: Path, name: str, registry: Path, shadow: bool
) -> tuple[str, str]:
    """The gateway's data-port and admin-port base URLs, once it is ready."""
    port, admin_port = free_port(), free_port()
    policies = models.policies(work, "shadow" if shadow else None)
    argv = [sys.executable, "-m", "rollguard.proxy.cli", "serve", "--port", str(port)]
    argv += ["--admin-port", str(admin_port)]
    argv += ["--registry", str(registry), "--policies", str(policies)]
    argv += ["--state", str(work / f"state-{name}")]
    # A loopback benchmark: admin without a token, asked for explicitly (admin_auth none).
    env = {"ROLLGUARD_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
    env |= {"ROLLGUARD_ADMIN_AUTH": "none", "ROLLGUARD_ADMIN_TOKEN": ""}
    # gRPC on as by default, on a port of its own: the two gateways run side by side.
    env["ROLLGUARD_GRPC_PORT"] = str(free_port())
    process = procs.start(name, argv, env=env, cwd=REPO)
    base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    process.wait_ready(f"{base}/v2/models/{models.MODEL}/ready", 120)
    process.wait_ready(f"{base}/v2/models/{models.MODEL}/versions/{models.CANDIDATE}/ready", 60)
    if shadow:
        process.wait_ready(f"{admin}/admin/rollouts/bench-shadow", 60)
    return base, admin


def shadow_counts(admin: str) -> dict[str, float]:
    """rollguard_shadow_requests_total by result, summed over versions (admin port)."""
    with urllib.request.urlopen(f"{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for labels, value in _SHADOW.findall(text):
        result = re.search(r'result="(\w+)"', labels)
        if result:
            counts[result.group(1)] = counts.get(result.group(1), 0.0) + float(value)
    return counts


def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    demo = models.build_demo(work, ("onnx",))
    body = models.request_body()
    headers = client.user_headers(models.KEY_HEADER)
    with Processes(work / "logs") as procs:
        slow_port = free_port()
        argv = [sys.executable, "-m", "load_tests.bench.bare", "--port", str(slow_port)]
        argv += ["--model", str(models.onnx_path(demo)), "--name", models.MODEL]
        slow: Process = procs.start(
            "slow-upstream",
            [*argv, "--delay-ms", str(args.delay_ms)],
            env={"PYTHONPATH": str(REPO)},
        )
        slow_base = f"http://127.0.0.1:{slow_port}"
        slow.wait_ready(f"{slow_base}/v2/health/ready", 60)
        registry = build_registry(demo, work, slow_base)
        gateways = {
            "off": start_gateway(procs, work, "gateway-no-shadow", registry, shadow=False),
            "on": start_gateway(procs, work, "gateway-shadow", registry, shadow=True),
        }
        results: dict[str, list[client.LoadResult]] = {"off": [], "on": []}
        for round_ in range(1, args.rounds + 1):
            for mode, (base, _admin) in gateways.items():
                url = f"{base}/v2/models/{models.MODEL}/infer"
                asyncio.run(
                    client.open_loop(url, body, rate=args.rate, duration_s=1.0, headers=headers)
                )  # warm-up
                result = asyncio.run(
                    client.open_loop(
                        url, body, rate=args.rate, duration_s=args.duration, headers=headers
                    )
                )
                results[mode].append(result)
                print(
                    f"round {round_} shadow {mode:<3}  {result.requests} answered, "
                    f"{result.errors} errors  p50 {result.p50_ms:.2f} ms  "
                    f"p99 {result.p99_ms:.2f} ms",
                    flush=True,
                )
        counts = shadow_counts(gateways["on"][1])
    summary: dict[str, object] = {"counts": counts}
    for mode, runs in results.items():
        summary[mode] = {
            "p50_ms": statistics.median(r.p50_ms for r in runs),
            "p99_ms": statistics.median(r.p99_ms for r in runs),
            "requests": sum(r.requests for r in runs),
            "errors": sum(r.errors for r in runs),
            "runs": [{"p50_ms": r.p50_ms, "p99_ms": r.p99_ms} for r in runs],
        }
    return summary


def report(summary: dict[str, object], args: argparse.Namespace) -> str:
    off, on = summary["off"], summary["on"]
    assert isinstance(off, dict) and isinstance(on, dict)
    counts = summary["counts"]
    assert isinstance(counts, dict)
    ratio = on["p99_ms"] / off["p99_ms"]
    verdict = "met" if ratio <= 1.10 else f"MISSED by {(ratio / 1.10 - 1) * 100:.0f}%"
    host = machine({})
    mirrored = sum(counts.values())
    lines = [
        "# Shadow latency: a 200 ms shadow against the client's p99",
        "",
        f"`python -m load_tests.bench_shadow`, {datetime.now(UTC).isoformat(timespec='seconds')}. "
        f"Open-loop client at {args.rate:g} requests/s for {args.duration:g} s per run, "
        f"{args.rounds} interleaved round(s) per mode (medians shown); latency from each "
        f"request's scheduled start. Primary: fraud-onnx {models.STABLE} in-process (ONNX); "
        f"shadow: {models.CANDIDATE} as an `http` version whose upstream sleeps "
        f"{args.delay_ms:g} ms. Gateway settings: config/rollguard.yaml defaults "
        "(shadow_concurrency 64, shadow_queue 256, shadow_timeout_s 5).",
        "",
        "| shadow | answered | errors | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
        f"| off | {off['requests']} | {off['errors']} | {off['p50_ms']:.2f} "
        f"| {off['p99_ms']:.2f} |",
        f"| on (100% mirrored) | {on['requests']} | {on['errors']} | {on['p50_ms']:.2f} "
        f"| {on['p99_ms']:.2f} |",
        "",
        f"- p99 on / off: **{ratio:.2f}** (goal at most 1.10: {verdict})",
        f"- p50 on / off: {on['p50_ms'] / off['p50_ms']:.2f}",
        "- per round, p99 on / off: "
        + ", ".join(
            f"{b['p99_ms'] / a['p99_ms']:.2f} ({a['p99_ms']:.2f} → {b['p99_ms']:.2f} ms)"
            for a, b in zip(off["runs"], on["runs"], strict=True)
        )
        + "; the p99 is a few milliseconds at this rate, and on a shared machine one round"
        " can move by more than the effect: read the rounds together",
        "- shadow copies (rollguard_shadow_requests_total, warm-ups included): "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(counts.items()))
        + (
            f"; {(counts.get('dropped', 0) + counts.get('shed', 0)) / mirrored:.0%} not"
            " mirrored (dropped: queue full; shed: busy)"
            if mirrored
            else ""
        ),
        "",
        f"Machine: {host['nproc']} CPUs, {host['cpu']}, Python {host['python']}, "
        f"load average at end {host['load_average_at_start']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=200.0, help="the shadow's sleep")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rollguard-shadow-") as scratch:
        summary = run(args, Path(scratch))
    text = report(summary, args)
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shadow.md").write_text(text, encoding="utf-8")
    print(f"wrote {args.out / 'shadow.md'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    sys.exit(main())
