"""Benchmark: dynamic micro-batching on and off, C concurrent single-row callers, same executor.

Run: `python load_tests/bench_batching.py` (about a minute). It builds the wide MLP of
load_tests/bench/mlp.py (load_digits, ONNX via skl2onnx; the model the peer benchmark's
rollguard-mlp targets serve over HTTP), serves it with the OnnxRunner on a 2-thread
executor, and drives C concurrent callers, each sending one row at a time, first
straight to the runner, then through a BatchingRunner. It prints rows/s, p50 and p99
latency per mode and the ratio. It asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from load_tests.bench import mlp
from rollguard.serving.batching import BatchingRunner
from rollguard.serving.manifest import Manifest
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.runners import LocalRunner, Runner, Wrapper, create_runner
from rollguard.serving.scheduling import Scheduled


class CountingRunner(Wrapper):
    """Delegates to a runner and counts its calls and rows, to report batch sizes."""

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner)
        self.calls = 0
        self.rows = 0

    async def predict(self, request: InferRequest) -> InferResponse:
        self.calls += 1
        self.rows += request.rows()
        return await self.inner.predict(request)


def build_model(directory: Path, hidden: int, layers: int) -> tuple[Manifest, np.ndarray]:
    """The shared wide MLP (load_tests/bench/mlp.py) as a registry version, and its rows."""
    manifest = mlp.write_version(directory, mlp.train_onnx(hidden, layers))
    return manifest, mlp.digits()


async def drive(
    runner: Runner, rows: np.ndarray, requests: int, concurrency: int
) -> tuple[float, np.ndarray, np.ndarray]:
    """C callers send single rows until `requests` are done: (seconds, latencies, probs)."""
    latencies = np.zeros(requests)
    probabilities = np.zeros((requests, 10), dtype=np.float32)
    next_index = 0

    async def caller() -> None:
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            row = rows[i % len(rows)][None, :]
            start = time.perf_counter()
            out = await runner.predict(InferRequest.of_arrays({"input": row}))
            latencies[i] = time.perf_counter() - start
            probabilities[i] = out.arrays()["probabilities"][0]

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies, probabilities


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        manifest, rows = build_model(Path(tmp) / "wide-mlp" / "1", args.hidden, args.layers)
        print(
            f"model: MLP {args.layers}x{args.hidden} on load_digits, ONNX, "
            f"built in {time.perf_counter() - started:.1f} s; executor: {args.threads} threads, "
            f"{args.concurrency} concurrent single-row callers, {args.requests} requests a mode"
        )
        local = create_runner(manifest, Path(tmp) / "wide-mlp" / "1")
        assert isinstance(local, LocalRunner)
        # Every call on the executor (never inline), no practical time limit.
        inner = Scheduled(local, args.threads, inline_below_us=0.0, timeout_s=3600.0)
        await inner.load()
        single = InferRequest.of_arrays({"input": rows[:1]})
        for _ in range(20):
            await inner.predict(single)
        t0 = time.perf_counter()
        for _ in range(100):
            await inner.predict(single)
        print(f"one row, one caller: {(time.perf_counter() - t0) * 10:.2f} ms a call")
        results = {}
        for mode in ("off", "on"):
            counting = CountingRunner(inner)
            runner: Runner = counting
            if mode == "on":
                runner = BatchingRunner(
                    counting,
                    max_batch_size=args.max_batch_size,
                    max_delay_ms=args.max_delay_ms,
                    max_concurrent_batches=args.threads,
                )
            await runner.load()
            await drive(runner, rows, args.concurrency * 4, args.concurrency)  # warm-up
            counting.calls = counting.rows = 0
            seconds, latencies, probabilities = await drive(
                runner, rows, args.requests, args.concurrency
            )
            results[mode] = (seconds, latencies, probabilities, counting.rows / counting.calls)
            await runner.unload()
        print(f"\n{'batching':<10}{'rows/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'rows/call':>11}")
        for mode, (seconds, latencies, _, per_call) in results.items():
            print(
                f"{mode:<10}{args.requests / seconds:>10.0f}"
                f"{np.percentile(latencies, 50) * 1e3:>10.2f}"
                f"{np.percentile(latencies, 99) * 1e3:>10.2f}{per_call:>11.1f}"
            )
        off, on = results["off"], results["on"]  # (seconds, latencies, probs, rows/call)
        print(f"\nthroughput ratio on/off: {off[0] / on[0]:.2f}x")
        same = np.allclose(off[2], on[2], atol=1e-5)
        print(f"outputs equal in both modes (atol 1e-5): {'yes' if same else 'NO'}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=mlp.HIDDEN)
    parser.add_argument("--layers", type=int, default=mlp.LAYERS)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    return parser.parse_args()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(parse_args()))
    else:
        uvloop.run(main(parse_args()))
