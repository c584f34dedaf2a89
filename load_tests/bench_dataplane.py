"""Micro-benchmark of one in-process request through the data plane, without sockets.

Run `python -m load_tests.bench_dataplane`. It starts the real gateway in this process
(the benchmark's in-process ONNX registry and its canary rollout at 25 %, as
`python -m load_tests.bench` serves it), then awaits `DataPlane.handle` on parsed
requests back to back. Each request is decoded, routed, run inline, checked, recorded
and encoded; HTTP parsing and socket writes are left out. It prints the event-loop
thread's CPU microseconds per request, the least of `--repeat` runs (the least disturbed
one on a shared machine), and with `--profile` the top functions by own time
(cProfile).

This is how the in-process regression of issue 17 was found and cut: the same numbers
at different commits (load_tests/results/dataplane.md). Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from load_tests.bench import models
from rollguard.proxy.gateway import Gateway
from rollguard.proxy.settings import Settings
from rollguard.proxy.wire import Request

INFER = f"/v2/models/{models.MODEL}/infer"


def requests(n: int = 1024) -> list[Request]:
    """`n` parsed V2 requests of the common body, each from its own user."""
    body = models.request_body()
    rng = random.Random(1)
    return [
        Request(
            "POST",
            INFER,
            "",
            {
                "content-type": "application/json",
                "content-length": str(len(body)),
                models.KEY_HEADER: f"user-{rng.randrange(10**8)}",
            },
            body,
            "1.1",
            True,
        )
        for _ in range(n)
    ]


async def measure(
    work: Path, *, requests_per_run: int, repeat: int, strategy: str | None, profile: bool
) -> dict[str, float]:
    """Event-loop CPU µs per request (least and median of `repeat` runs)."""
    demo = models.build_demo(work, ("onnx",))
    settings = Settings(
        registry=models.inprocess_registry(demo, work),
        policies=models.policies(work, strategy),
        state=work / "state",
        port=0,
        admin_port=0,
        admin_auth="none",
        grpc_enabled=False,
        log_level="WARNING",
    )
    gateway = Gateway(settings)
    await gateway.start()
    try:
        plane = gateway.data_plane
        batch = requests()
        deadline = time.monotonic() + 60
        while strategy is not None and gateway.inference.router.table(models.MODEL) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the rollout never started routing")
            await asyncio.sleep(0.05)
        for i in range(2000):  # warm-up: both versions measured and running inline
            answer = await plane.handle(batch[i & 1023])
            if answer.status != 200:
                raise RuntimeError(f"warm-up request failed: {answer.status} {answer.body!r}")
        runs = []
        for _ in range(repeat):
            start = time.thread_time()
            for i in range(requests_per_run):
                await plane.handle(batch[i & 1023])
            runs.append((time.thread_time() - start) / requests_per_run * 1e6)
            await asyncio.sleep(0.05)  # let rollout ticks and shadow copies run between runs
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for i in range(requests_per_run):
                await plane.handle(batch[i & 1023])
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        await gateway.shadow.drain()
    finally:
        await gateway.close()
    return {"least_us": min(runs), "median_us": sorted(runs)[len(runs) // 2]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--strategy", choices=("canary", "shadow", "none"), default="canary", help="rollout"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile one more run")
    args = parser.parse_args(argv)
    strategy = None if args.strategy == "none" else args.strategy
    with tempfile.TemporaryDirectory(prefix="rollguard-dataplane-") as scratch:
        found = uvloop.run(
            measure(
                Path(scratch),
                requests_per_run=args.requests,
                repeat=args.repeat,
                strategy=strategy,
                profile=args.profile,
            )
        )
    print(
        f"python {sys.version.split()[0]}, {args.strategy}: event-loop CPU per request "
        f"{found['least_us']:.1f} µs (least of {args.repeat}), median {found['median_us']:.1f} µs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
