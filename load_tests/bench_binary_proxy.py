"""Benchmark: 600 KB binary-tensor requests through rollguard's proxy mode vs. direct.

Run: `python -m load_tests.bench_binary_proxy` (about a minute). A V2 upstream taking the
binary tensor extension runs in a subprocess (`--serve`); `rollguard serve` runs in
another, with one `framework: http` version pointing at it. This process then sends the
same request (FP32 [1, 153600]: 614,400 bytes of tensor data, the
Inference-Header-Content-Length extension) `--requests` times, `--concurrency` at a time,
directly and through rollguard, in interleaved rounds (a shared machine's speed drifts),
and reports each round's requests/s, the median ratio (rollguard / direct), and whether
the bytes the upstream received from rollguard equal the bytes the client sent: the
request is forwarded as it came, not re-encoded (as JSON it was 1.6 MB). Asserts only
that the bytes match; prints the numbers and writes load_tests/results/bench_binary_proxy.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import uvloop
from aiohttp import web

from rollguard.proxy.process import GatewayProcess, free_port

MODEL = "/v2/models/big/versions/1"
WIDTH = 153_600  # FP32 values: 614,400 bytes
RESULTS = Path(__file__).resolve().parent / "results" / "bench_binary_proxy.md"


def request_body() -> tuple[bytes, int]:
    """A binary V2 request for one [1, WIDTH] FP32 row, and its JSON header's length."""
    raw = np.linspace(0, 1, WIDTH, dtype=np.float32).tobytes()
    head = orjson.dumps(
        {
            "id": "bench",
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, WIDTH],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "total"}],
        }
    )
    return head + raw, len(head)


# --- the upstream (a subprocess) ------------------------------------------------------------


def serve(port: int) -> None:
    received: list[bytes] = []  # the last proxied body, for the byte check

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        n = int(request.headers["Inference-Header-Content-Length"])
        doc = orjson.loads(body[:n])
        size = doc["inputs"][0]["parameters"]["binary_data_size"]
        total = float(np.frombuffer(body[n : n + size], dtype=np.float32).sum())
        if request.headers.get("x-bench") != "direct":
            received[:] = [body]
        answer = {
            "model_name": "big",
            "model_version": "1",
            "id": doc.get("id"),
            "outputs": [{"name": "total", "datatype": "FP32", "shape": [1], "data": [total]}],
        }
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def last(request: web.Request) -> web.Response:
        return web.Response(body=received[0] if received else b"")

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_get(f"{MODEL}/ready", ready)
    app.router.add_post(f"{MODEL}/infer", infer)
    app.router.add_get("/last", last)
    web.run_app(app, host="127.0.0.1", port=port, print=None, loop=uvloop.new_event_loop())


# --- the client ------------------------------------------------------------------------------


async def rate(url: str, headers: dict[str, str], body: bytes, n: int, concurrency: int) -> float:
    """Requests per second for `n` POSTs of `body`, `concurrency` at a time."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with http.post(url, data=body, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()

        await worker()  # warm-up: one request, connection made
        left = n
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - start)


async def run(port: int, requests: int, concurrency: int, rounds: int) -> str:
    """The report, against the upstream on `port`."""
    body, header_length = request_body()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        version = root / "registry" / "big" / "1"
        version.mkdir(parents=True)
        (version / "model.yaml").write_text(
            f"name: big\nversion: '1'\nframework: http\n"
            f"endpoint: http://127.0.0.1:{port}{MODEL}\nstage: production\n"
            f"inputs: [{{name: x, datatype: FP32, shape: [-1, {WIDTH}]}}]\n"
        )
        (root / "policies").mkdir()
        gateway = GatewayProcess(
            registry=root / "registry",
            policies=root / "policies",
            state=root / "state",
            log=root / "gateway.log",
            env={
                "ROLLGUARD_ADMIN_AUTH": "none",
                "ROLLGUARD_MAX_BODY_BYTES": str(4 << 20),
                "ROLLGUARD_LOG_LEVEL": "WARNING",
            },
        )
        try:
            async with aiohttp.ClientSession() as http:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}{MODEL}/ready") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError("the upstream did not start")
                    await asyncio.sleep(0.1)
                await gateway.wait_ready(http)
            headers = {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(header_length),
            }
            direct_url = f"http://127.0.0.1:{port}{MODEL}/infer"
            proxy_url = f"http://127.0.0.1:{gateway.port}/v2/models/big/infer"
            rows = []
            for _ in range(rounds):
                direct = await rate(direct_url, headers | {"x-bench": "direct"}, body,
                                    requests, concurrency)  # fmt: skip
                proxied = await rate(proxy_url, headers, body, requests, concurrency)
                rows.append((direct, proxied))
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/last") as r,
            ):
                forwarded = await r.read()
        finally:
            gateway.stop()
    same = forwarded == body
    assert same, f"the upstream received {len(forwarded)} bytes, the client sent {len(body)}"
    ratio = statistics.median(p / d for d, p in rows)
    lines = [
        "# Proxy mode with a 600 KB binary tensor vs direct to the upstream",
        "",
        f"`python -m load_tests.bench_binary_proxy --requests {requests} --concurrency "
        f"{concurrency} --rounds {rounds}`: one [1, {WIDTH}] FP32 row ({len(body):,} bytes "
        "with its JSON header), binary tensor extension, loopback, 2 shared cores.",
        "",
        "| round | direct req/s | through rollguard req/s | ratio |",
        "|---|---|---|---|",
        *(f"| {i + 1} | {d:.0f} | {p:.0f} | {p / d:.2f} |" for i, (d, p) in enumerate(rows)),
        "",
        f"Median ratio (rollguard / direct): **{ratio:.2f}**. Bytes the upstream received "
        f"through rollguard: {len(forwarded):,}; bytes the client sent: {len(body):,} "
        f"({'identical' if same else 'DIFFERENT'}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.name}")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    port = free_port()
    command = [sys.executable, "-m", "load_tests.bench_binary_proxy", "--serve", str(port)]
    upstream = subprocess.Popen(command)
    try:
        report = uvloop.run(run(port, args.requests, args.concurrency, args.rounds))
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
    print(report)
    if args.write:
        RESULTS.write_text(report)


if __name__ == "__main__":
    main()
