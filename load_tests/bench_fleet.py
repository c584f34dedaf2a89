"""Benchmark: fleet mode against the file state, and `serve --workers 2` against one worker.

Run: `python -m load_tests.bench_fleet` (about four minutes; `--quick`: one round of
2 s runs, what the smoke test runs). A redis-server runs on loopback with no persistence;
the benchmark's in-process ONNX registry and its canary rollout at 25 % (hash split,
every check evaluated each second, as `python -m load_tests.bench` serves it) are served
by four `rollguard serve` processes started once:

- (a) one process with a state directory, one with `state: redis://` (its own Redis
  database): the throughput of one process, each driven in turn by the same wrk run;
- (b) `--workers 2` and one worker, both in fleet mode (a Redis database each): the
  throughput on the one data port, and the CPU time of every process serving it
  (supervisor and workers) per request.

Runs are interleaved (a, then b, the order swapped every round: a shared machine's
speed drifts), each after an unmeasured second of the same load, and each figure is the
median of the per-round ratios. Every answer must
be a 200 (wrk's non-2xx and socket errors are counted and reported). Asserts nothing
about speed; writes load_tests/results/bench_fleet.md unless `--quick` or `--no-write`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from load_tests.bench import models, procs, wrk
from load_tests.redis_server import RedisServer
from rollguard.proxy.process import GatewayProcess, free_port_run

RESULTS = Path(__file__).resolve().parent / "results" / "bench_fleet.md"
ROLLOUT = "bench-canary"
TOKEN = "bench-fleet-admin-token-0123456789"


@dataclass(frozen=True)
class Run:
    """One wrk run against one target."""

    target: str
    requests: int
    errors: int
    seconds: float
    cpu_seconds: float  # every process of the target, supervisor and workers

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / max(self.requests, 1) * 1e6


@dataclass
class Target:
    """A started `rollguard serve`, its processes and how many workers serve it."""

    name: str
    gateway: GatewayProcess
    workers: int

    def pids(self) -> list[int]:
        return procs.process_tree([self.gateway.proc.pid])


@contextmanager
def redis_server(directory: Path) -> Iterator[int]:
    """A loopback redis-server without persistence; its port."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server)")
    server = RedisServer(binary, directory)
    server.start(persist=False)
    try:
        yield server.port
    finally:
        server.stop()


def _wait(condition: Callable[[], bool], limit_s: float, what: str) -> None:
    """Poll `condition()` every 50 ms until true; RuntimeError after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready within {limit_s:g}s")
        time.sleep(0.05)


def _phase(admin_url: str) -> str:
    request = urllib.request.Request(f"{admin_url}/admin/rollouts/{ROLLOUT}")
    request.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return str(json.loads(response.read())["phase"])
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return "?"


def start(
    name: str, work: Path, registry: Path, policies: Path, state: str, workers: int
) -> Target:
    """`rollguard serve` with `workers` workers; returns once every worker routes the canary."""
    # Worker K listens on admin_port + K: the run is taken below the ephemeral range, where
    # no outgoing connection (wrk's, Redis's) can hold one of its ports.
    admin_port = free_port_run(workers)
    env = {
        **os.environ,
        "ROLLGUARD_ADMIN_TOKEN": TOKEN,
        "ROLLGUARD_GRPC_ENABLED": "false",
        "ROLLGUARD_LOG_LEVEL": "WARNING",
        "ROLLGUARD_WORKERS": str(workers),
    }
    gateway = GatewayProcess(
        registry=registry,
        policies=policies,
        state=state,
        log=work / f"{name}.log",
        port=free_port_run(1),
        admin_port=admin_port,
        env=env,
    )
    target = Target(name, gateway, workers)
    admins = [f"http://127.0.0.1:{admin_port + k}" for k in range(workers)]

    def routing() -> bool:
        if gateway.proc.poll() is not None:
            tail = gateway.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited; the end of {gateway.log}:\n{tail}")
        return all(_phase(url) == "progressing" for url in admins)

    _wait(routing, 120.0, name)
    return target


def measure(
    target: Target, body: bytes, *, connections: int, seconds: float, warmup_s: float
) -> Run:
    """One wrk run against `target`'s data port, with its processes' CPU time, after an
    unmeasured `warmup_s` run (the target wakes up, the previous target's load is over)."""
    url = f"{target.gateway.url}/v2/models/{models.MODEL}/infer"
    binary = shutil.which("wrk") or "wrk"
    if warmup_s > 0:
        wrk.run(binary, url, body, key_header=models.KEY_HEADER, connections=connections,
                threads=2, duration_s=warmup_s)  # fmt: skip
    before = procs.cpu_seconds(target.pids())
    found = wrk.run(binary, url, body, key_header=models.KEY_HEADER, connections=connections,
                    threads=2, duration_s=seconds)  # fmt: skip
    cpu = procs.cpu_delta(before, procs.cpu_seconds(target.pids()))
    return Run(target.name, found.requests, found.errors, found.duration_s, cpu)


def _commit() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=repo, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} + local changes" if dirty else head


def report(
    rounds: list[dict[str, Run]], argv: str, load: tuple[float, float], when: str
) -> list[str]:
    """The results as Markdown lines."""

    def ratio(new: str, old: str, per_process: int = 1) -> list[float]:
        return [r[new].per_second / per_process / r[old].per_second for r in rounds]

    fleet = ratio("fleet", "file")
    two = ratio("workers-2", "workers-1")
    lines = [
        "# Fleet mode and `serve --workers 2`: throughput",
        "",
        f"`{argv}`, {when}, commit {_commit()}. {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} before and {load[1]:.2f} after (the machine is shared: "
        "other sessions run simulations on it, so single rounds vary; compare ratios "
        "within a round). Loopback only; wrk (2 threads) on the same 2 cores as the "
        "servers. The benchmark's ONNX model in process, a canary at 25 % (hash split, "
        "error-rate, p99 and SRM checks every second); gRPC off; each answer a 200.",
        "",
        "| round | target | req/s | per process | CPU µs/request (all its processes) | errors |",
        "|---|---|---|---|---|---|",
    ]
    for i, runs in enumerate(rounds, 1):
        for name in ("file", "fleet", "workers-1", "workers-2"):
            run = runs[name]
            per = 2 if name == "workers-2" else 1
            lines.append(
                f"| {i} | {name} | {run.per_second:.0f} | {run.per_second / per:.0f} "
                f"| {run.cpu_us:.0f} | {run.errors} |"
            )
    lines += [
        "",
        "| comparison | per round | median |",
        "|---|---|---|",
        f"| (a) fleet / file state, one process each (goal ≥ 0.95) "
        f"| {', '.join(f'{x:.2f}' for x in fleet)} | **{statistics.median(fleet):.2f}** |",
        f"| (b) `--workers 2` / 1 worker, on the one data port "
        f"| {', '.join(f'{x:.2f}' for x in two)} | **{statistics.median(two):.2f}** |",
        "| (b) per process: `--workers 2` / 2 / 1 worker "
        f"| {', '.join(f'{x / 2:.2f}' for x in two)} | {statistics.median(two) / 2:.2f} |",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # wrk takes whole seconds only
    parser.add_argument("--seconds", type=int, default=5, help="each measured wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured, before each")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32, help="wrk's, in total")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s; writes nothing")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.rounds = 2, 1, 1
    if args.rounds < 1 or args.seconds <= 0 or args.connections < 1:
        parser.error("--rounds, --seconds and --connections must be positive")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian package wrk)")
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rollguard-bench-fleet-") as scratch:
        work = Path(scratch)
        demo = models.build_demo(work, ("onnx",))
        registry = models.inprocess_registry(demo, work)
        policies = models.policies(work, "canary")
        body = models.request_body()
        with ExitStack() as stack:
            redis = stack.enter_context(redis_server(work))
            url = f"redis://127.0.0.1:{redis}"
            specs = [
                ("file", str(work / "state"), 1),
                ("fleet", f"{url}/1", 1),
                ("workers-1", f"{url}/2", 1),
                ("workers-2", f"{url}/3", 2),
            ]
            targets: dict[str, Target] = {}
            for name, state, workers in specs:
                target = start(name, work, registry, policies, state, workers)
                stack.callback(target.gateway.stop)
                targets[name] = target
            rounds: list[dict[str, Run]] = []
            for i in range(args.rounds):
                order = ["file", "fleet", "workers-1", "workers-2"]
                if i % 2:
                    order = ["fleet", "file", "workers-2", "workers-1"]
                runs = {
                    name: measure(
                        targets[name],
                        body,
                        connections=args.connections,
                        seconds=args.seconds,
                        warmup_s=args.warmup,
                    )
                    for name in order
                }
                rounds.append(runs)
                print(
                    f"round {i + 1}: "
                    + ", ".join(f"{n} {r.per_second:.0f}/s" for n, r in runs.items()),
                    flush=True,
                )
    command = "python -m load_tests.bench_fleet" + (" " + " ".join(argv) if argv else "")
    if argv is None:
        command = "python -m load_tests.bench_fleet " + " ".join(sys.argv[1:])
    lines = report(rounds, command.strip(), (load_before, os.getloadavg()[0]), when)
    text = "\n".join(lines) + "\n"
    print(text)
    if not (args.quick or args.no_write):
        RESULTS.write_text(text, encoding="utf-8")
        print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
