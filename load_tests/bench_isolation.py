"""Benchmark: what process isolation costs, against the same model on threads, in one run.

Run: `python load_tests/bench_isolation.py` (about three minutes; `--seconds`,
`--rounds` to change it). It builds two MLPs on load_digits in ONNX (load_tests/bench/
mlp.py): a small one (1x16, microseconds a call: the overhead of a call shows) and the
wide one of the batching benchmark (4x2048, milliseconds a call: compute shows), and
serves each three ways, all with 2 of them per version, as `rollguard serve` would:

- `inline`: Scheduled as configured by default (threads, and the event loop once a
  call is measured under 100 us: only the small model qualifies),
- `threads`: Scheduled with inline off (every call on the version's 2 threads),
- `process`: ProcessIsolated (`runtime: {isolation: process}`, 2 worker processes).

For single rows (1 caller, 8 callers) and 64-row batches (8 callers), closed-loop
callers send calls back to back for `--seconds`; rounds interleave the modes (a shared
machine's speed drifts) and each ratio is the median of its per-round ratios. It also
times a worker's start and a restart after a kill, and reads the workers' memory. It
asserts nothing about speed; it writes the table to stdout (and `--out` as Markdown).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from load_tests.bench import mlp
from rollguard.serving.isolation import ProcessIsolated
from rollguard.serving.manifest import Manifest
from rollguard.serving.messages import InferRequest
from rollguard.serving.runners import LocalRunner, Runner, create_runner
from rollguard.serving.scheduling import Scheduled

MODES = ("inline", "threads", "process")
WORKLOADS = (("1 row, 1 caller", 1, 1), ("1 row, 8 callers", 1, 8), ("64 rows, 8 callers", 64, 8))
TIMEOUT_S = 60.0


def make(mode: str, manifest: Manifest, directory: Path, workers: int) -> Runner:
    local = create_runner(manifest, directory)
    assert isinstance(local, LocalRunner)
    if mode == "process":
        return ProcessIsolated(local, workers, TIMEOUT_S)
    inline_us = 100.0 if mode == "inline" else 0.0
    return Scheduled(local, workers, inline_below_us=inline_us, timeout_s=TIMEOUT_S)


async def drive(
    runner: Runner, rows: np.ndarray, batch: int, callers: int, seconds: float
) -> dict[str, float]:
    """Closed-loop callers for `seconds`: calls/s, rows/s, p50 and p99 latency (ms)."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop:
            start = (i * batch) % (len(rows) - batch)
            request = InferRequest.of_arrays({"input": rows[start : start + batch]})
            began = time.perf_counter()
            await runner.predict(request)
            latencies.append(time.perf_counter() - began)
            i += callers

    began = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1e3
    return {
        "calls/s": len(latencies) / elapsed,
        "rows/s": len(latencies) * batch / elapsed,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
    }


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in kB, from /proc."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if ":" in line}
    return fields["Rss"], fields["Pss"]


async def starts(manifest: Manifest, directory: Path, rows: np.ndarray) -> dict[str, float]:
    """A 1-worker version's load, and the time from killing its worker to an answer."""
    began = time.perf_counter()
    runner = make("process", manifest, directory, 1)
    assert isinstance(runner, ProcessIsolated)
    await runner.load()
    loaded = time.perf_counter() - began
    request = InferRequest.of_arrays({"input": rows[:1]})
    await runner.predict(request)
    (pid,) = runner.worker_pids()
    rss, pss = memory_kb(pid)
    killed = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    while pid in runner.worker_pids():  # noqa: ASYNC110 - until the pool sees it gone
        await asyncio.sleep(0.0005)
    await runner.predict(request)  # waits for the new worker
    restarted = time.perf_counter() - killed
    await runner.unload()
    return {
        "load s": loaded,
        "restart s": restarted,
        "worker RSS MB": rss / 1024,
        "worker PSS MB": pss / 1024,
    }


async def bench_model(
    name: str, hidden: int, layers: int, args: argparse.Namespace, tmp: Path
) -> list[str]:
    directory = tmp / name / "1"
    manifest = mlp.write_version(directory, mlp.train_onnx(hidden, layers), name=name, version="1")
    size_mb = (directory / "model.onnx").stat().st_size / 1e6
    rows = mlp.digits()
    runners = {mode: make(mode, manifest, directory, args.workers) for mode in MODES}
    for runner in runners.values():
        await runner.load()
        for _ in range(64):  # warm-up; lets `inline` measure and go inline when it can
            await runner.predict(InferRequest.of_arrays({"input": rows[:1]}))
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_ in range(args.rounds):
        for label, batch, callers in WORKLOADS:
            order = MODES if round_ % 2 == 0 else MODES[::-1]
            for mode in order:
                found = await drive(runners[mode], rows, batch, callers, args.seconds)
                results.setdefault((label, mode), []).append(found)
    for runner in runners.values():
        await runner.unload()
    started = await starts(manifest, directory, rows)

    lines = [
        f"\n### {name}: MLP {layers}x{hidden} on load_digits, ONNX, {size_mb:.1f} MB, "
        f"{args.workers} threads or workers per version\n",
        "| workload | mode | calls/s | rows/s | p50 ms | p99 ms | calls/s vs threads "
        "| p50 vs threads |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, _, _ in WORKLOADS:
        for mode in MODES:
            runs = results[(label, mode)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            base = results[(label, "threads")]
            speed = statistics.median(
                r["calls/s"] / b["calls/s"] for r, b in zip(runs, base, strict=True)
            )
            p50 = statistics.median(r["p50"] / b["p50"] for r, b in zip(runs, base, strict=True))
            lines.append(
                f"| {label} | {mode} | {med['calls/s']:,.0f} | {med['rows/s']:,.0f} | "
                f"{med['p50']:.3f} | {med['p99']:.3f} | {speed:.2f}x | {p50:.2f}x |"
            )
    lines.append(
        f"\nOne worker: loaded in {started['load s']:.2f} s (fork server already up), back "
        f"serving {started['restart s']:.2f} s after a SIGKILL; RSS "
        f"{started['worker RSS MB']:.0f} MB, PSS {started['worker PSS MB']:.0f} MB "
        "(pages shared with the fork server counted once)."
    )
    return lines


async def main(args: argparse.Namespace) -> None:
    began = time.perf_counter()
    out = [
        "# Process isolation: cost against threads",
        f"\n`python load_tests/bench_isolation.py --rounds {args.rounds} "
        f"--seconds {args.seconds:g}` on {os.cpu_count()} cores; ratios are medians of "
        "per-round ratios (rounds interleave the modes).",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        out += await bench_model("small-mlp", 16, 1, args, Path(tmp))
        out += await bench_model("wide-mlp", mlp.HIDDEN, mlp.LAYERS, args, Path(tmp))
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    out.append(
        f"\nTotal run time {time.perf_counter() - began:.0f} s; load average at the end "
        f"{load} (1 / 5 / 15 min) on {os.cpu_count()} cores."
    )
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)  # noqa: ASYNC240 - once, at the end


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per mode, workload and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="threads or workers per version")
    parser.add_argument("--out", help="also write the Markdown table here")
    return parser.parse_args()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(parse_args()))
    else:
        uvloop.run(main(parse_args()))
