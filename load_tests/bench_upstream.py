"""Benchmark: serving.upstream.UpstreamPool against aiohttp's ClientSession as a V2 client.

Run: `python -m load_tests.bench_upstream` (about half a minute). A tiny aiohttp server
that echoes V2 infer bodies runs in a subprocess on 127.0.0.1; this process then sends
`--requests` POSTs (16 at a time by default) with each client in turn, after a warm-up,
and prints requests/s and the client process's CPU time per request (time.process_time)
side by side, with their ratio. Every answer is checked (status 200, the body echoed).
Asserts nothing about speed. `--serve` is the server's own entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson
import uvloop
from aiohttp import web

from rollguard.serving.upstream import UpstreamPool

PATH = "/v2/models/echo/versions/1/infer"
_JSON = {"Content-Type": "application/json"}
# A V2 infer request as rollguard forwards it: one FP32 row of 30 features.
BODY = orjson.dumps(
    {
        "id": "bench",
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, 30],
                "data": [round(0.1 * i, 3) for i in range(30)],
            }
        ],
    }
)

Send = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Result:
    client: str
    requests: int
    seconds: float
    cpu_seconds: float

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / self.requests * 1e6


async def serve() -> None:
    """The upstream: echo the infer body; stop when the parent closes our stdin."""

    async def infer(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/json")

    app = web.Application()
    app.router.add_post(PATH, infer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        print(sock.getsockname()[1], flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await runner.cleanup()


async def _drive(send: Send, requests: int, concurrency: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for `requests` calls, `concurrency` at once."""

    async def worker(count: int) -> None:
        for _ in range(count):
            await send()

    shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(n) for n in shares))
    return time.perf_counter() - wall, time.process_time() - cpu


async def bench_aiohttp(url: str, requests: int, warmup: int, concurrency: int) -> Result:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send() -> None:
            async with session.post(url, data=BODY, headers=_JSON) as response:
                payload = await response.read()
            if response.status != 200 or payload != BODY:
                raise RuntimeError(f"aiohttp: {response.status} {payload[:100]!r}")

        await _drive(send, warmup, concurrency)
        seconds, cpu = await _drive(send, requests, concurrency)
    return Result("aiohttp ClientSession", requests, seconds, cpu)


async def bench_pool(url: str, requests: int, warmup: int, concurrency: int) -> Result:
    pool = UpstreamPool(url, timeout_s=30, max_connections=concurrency)

    async def send() -> None:
        status, payload = await pool.request("POST", PATH, BODY, _JSON)
        if status != 200 or payload != BODY:
            raise RuntimeError(f"UpstreamPool: {status} {payload[:100]!r}")

    try:
        await _drive(send, warmup, concurrency)
        seconds, cpu = await _drive(send, requests, concurrency)
    finally:
        await pool.close()
    return Result("UpstreamPool", requests, seconds, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="aiohttp, pool, aiohttp, ...")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve())
        return
    if min(args.requests, args.concurrency, args.rounds) < 1 or args.warmup < 0:
        parser.error("--requests, --concurrency and --rounds must be >= 1, --warmup >= 0")

    server = subprocess.Popen(
        [sys.executable, "-m", "load_tests.bench_upstream", "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        origin = f"http://127.0.0.1:{port}"
        run = uvloop.run if args.loop == "uvloop" else asyncio.run
        results: list[Result] = []
        for _ in range(args.rounds):
            n, w, c = args.requests, args.warmup, args.concurrency
            results.append(run(bench_aiohttp(origin + PATH, n, w, c)))
            results.append(run(bench_pool(origin, n, w, c)))
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(10)

    print(f"{args.requests} POSTs of {len(BODY)} B, {args.concurrency} at once, {args.loop}")
    print(f"{'client':<24}{'requests/s':>12}{'CPU µs/request':>16}")
    for result in results:
        print(f"{result.client:<24}{result.per_second:>12.0f}{result.cpu_us:>16.1f}")
    old = min((r for r in results if r.client.startswith("aiohttp")), key=lambda r: r.cpu_us)
    new = min((r for r in results if r.client == "UpstreamPool"), key=lambda r: r.cpu_us)
    ratio_rps, ratio_cpu = new.per_second / old.per_second, old.cpu_us / new.cpu_us
    print(f"{'pool vs aiohttp (best)':<24}{ratio_rps:>11.2f}x{ratio_cpu:>15.2f}x less CPU")


if __name__ == "__main__":
    main()
