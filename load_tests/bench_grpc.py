"""Benchmark: V2 gRPC infer through rollguard vs V2 REST infer through rollguard.

Run: `python -m load_tests.bench_grpc` (under a minute). `rollguard serve` runs in a
subprocess with one small ONNX model (FP32 [-1, 30] -> label, probabilities, made here)
on its data port and its gRPC port. This process sends the same one-row request
`--requests` times, `--concurrency` at a time, over gRPC (raw_input_contents, as
tritonclient.grpc sends it; grpc.aio with the message serialised once), over REST with
the binary tensor extension and over REST with JSON (aiohttp), in interleaved rounds (a
shared machine's speed drifts), and reports each round's requests/s and the median of the
per-round ratios gRPC / REST, and the gateway process's CPU time per request (from
/proc: what a shared machine's neighbours disturb least). Every answer is checked to be a
200 / OK with the right label. Writes load_tests/results/bench_grpc.md (or `--out`); no
speed is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import orjson

from rollguard.proxy.process import GatewayProcess
from rollguard.serving.v2grpc import method, pb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "load_tests" / "results" / "bench_grpc.md"
WIDTH = 30


def write_model(directory: Path) -> np.ndarray:
    """registry/bench/1: a logistic layer as ONNX (MatMul, Add, Softmax, ArgMax); the
    one input row the benchmark sends."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(WIDTH, 2)).astype(np.float32)
    bias = np.zeros(2, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["logits0"]),
            helper.make_node("Add", ["logits0", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
        ],
        "bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, WIDTH])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2]),
        ],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    raw = model.SerializeToString()
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(raw)
    (directory / "model.yaml").write_text(
        "name: bench\nversion: '1'\nframework: onnx\nartifact: model.onnx\n"
        f"sha256: {hashlib.sha256(raw).hexdigest()}\nstage: production\n"
        f"inputs: [{{name: input, datatype: FP32, shape: [-1, {WIDTH}]}}]\n"
        "outputs: [{name: label, datatype: INT64, shape: [-1]},"
        " {name: probabilities, datatype: FP32, shape: [-1, 2]}]\n"
    )
    return rng.normal(size=(1, WIDTH)).astype(np.float32)


Send = Callable[[], Awaitable[int]]  # one request; its label
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def rate(send: Send, want: int, n: int, concurrency: int, pid: int) -> tuple[float, float]:
    """Requests per second for `n` calls of `send`, `concurrency` at a time, and the
    gateway's CPU microseconds per request."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            got = await send()
            assert got == want, f"label {got}, expected {want}"

    assert await send() == want  # warm-up: connection made
    cpu = cpu_seconds(pid)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return n / elapsed, (cpu_seconds(pid) - cpu) / n * 1e6


async def run(requests: int, concurrency: int, rounds: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        row = write_model(root / "registry" / "bench" / "1")
        (root / "policies").mkdir()
        gateway = GatewayProcess(
            registry=root / "registry",
            policies=root / "policies",
            state=root / "state",
            log=root / "gateway.log",
            env={"ROLLGUARD_ADMIN_AUTH": "none", "ROLLGUARD_LOG_LEVEL": "WARNING"},
        )
        try:
            connector = aiohttp.TCPConnector(limit=concurrency)
            async with (
                aiohttp.ClientSession(connector=connector) as http,
                grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
            ):
                await gateway.wait_ready(http)
                rows, floor = await _rounds(
                    http, channel, gateway, row, requests, concurrency, rounds
                )
        finally:
            gateway.stop()
    return _report(rows, floor, requests, concurrency, rounds)


async def _rounds(
    http: aiohttp.ClientSession,
    channel: grpc.aio.Channel,
    gateway: GatewayProcess,
    row: np.ndarray,
    requests: int,
    concurrency: int,
    rounds: int,
) -> tuple[list[list[tuple[float, float]]], float]:
    """Each round's (req/s, gateway CPU µs/req) per transport, and the gateway's CPU
    µs per empty gRPC call (ServerLive): grpc's own floor."""
    url = f"{gateway.url}/v2/models/bench/infer"
    outputs = [{"name": "label"}]
    json_body = orjson.dumps(
        {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, WIDTH],
                        "data": row.ravel().tolist()}],
            "outputs": outputs,
        }
    )  # fmt: skip
    raw = row.tobytes()
    head = orjson.dumps(
        {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, WIDTH],
                        "parameters": {"binary_data_size": len(raw)}}],
            "outputs": outputs,
        }
    )  # fmt: skip
    binary_body = head + raw
    binary_headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }
    message = pb.ModelInferRequest(model_name="bench")
    message.inputs.add(name="input", datatype="FP32", shape=[1, WIDTH])
    message.outputs.add(name="label")
    message.raw_input_contents.append(raw)
    grpc_body = message.SerializeToString()
    infer = method(channel, "ModelInfer", pb.ModelInferResponse)

    async def over_grpc() -> int:
        answer = await infer(grpc_body)
        return int(np.frombuffer(answer.raw_output_contents[0], dtype=np.int64)[0])

    json_headers = {"Content-Type": "application/json"}

    async def over_rest_json() -> int:
        async with http.post(url, data=json_body, headers=json_headers) as r:
            assert r.status == 200, await r.text()
            return int(orjson.loads(await r.read())["outputs"][0]["data"][0])

    async def over_rest_binary() -> int:
        async with http.post(url, data=binary_body, headers=binary_headers) as r:
            assert r.status == 200, await r.text()
            return int(orjson.loads(await r.read())["outputs"][0]["data"][0])

    live = method(channel, "ServerLive", pb.ServerLiveResponse)

    async def over_grpc_live() -> int:
        return int((await live(b"")).live)

    want = await over_rest_json()
    pid = gateway.proc.pid
    found = [
        [
            await rate(send, want, requests, concurrency, pid)
            for send in (over_grpc, over_rest_binary, over_rest_json)
        ]
        for _ in range(rounds)
    ]
    _, floor = await rate(over_grpc_live, 1, requests, concurrency, pid)
    return found, floor


def _report(
    rows: list[list[tuple[float, float]]],
    floor: float,
    requests: int,
    concurrency: int,
    rounds: int,
) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
        check=False,
    ).stdout.strip() or "unknown"  # fmt: skip
    vs_binary = statistics.median(g[0] / b[0] for g, b, _ in rows)
    vs_json = statistics.median(g[0] / j[0] for g, _, j in rows)
    cpu = [statistics.median(row[i][1] for row in rows) for i in range(3)]
    lines = [
        "# V2 gRPC vs V2 REST through rollguard",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit} (plus the working tree). "
        f"`python -m load_tests.bench_grpc --requests {requests} --concurrency {concurrency} "
        f"--rounds {rounds}`: one FP32 [1, {WIDTH}] row to a small ONNX model, the `label` "
        "output asked for; rollguard in a subprocess, the clients in this one (grpc.aio "
        "with the message serialised once; aiohttp for REST), loopback, 2 shared cores. "
        "Rounds interleave the three transports.",
        "",
        "| round | gRPC req/s (gateway CPU µs/req) | REST binary | REST JSON "
        "| gRPC / REST binary | gRPC / REST JSON |",
        "|---|---|---|---|---|---|",
        *(
            f"| {i + 1} | {g[0]:.0f} ({g[1]:.0f}) | {b[0]:.0f} ({b[1]:.0f}) "
            f"| {j[0]:.0f} ({j[1]:.0f}) | {g[0] / b[0]:.2f} | {g[0] / j[0]:.2f} |"
            for i, (g, b, j) in enumerate(rows)
        ),
        "",
        f"Median of the per-round throughput ratios: gRPC / REST binary **{vs_binary:.2f}**, "
        f"gRPC / REST JSON **{vs_json:.2f}**. Median gateway CPU per request: gRPC "
        f"**{cpu[0]:.0f} µs**, REST binary **{cpu[1]:.0f} µs**, REST JSON **{cpu[2]:.0f} µs**; "
        f"an empty gRPC call (ServerLive) costs the gateway {floor:.0f} µs: grpc's own floor.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500, help="per transport and round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS, help="the report's file")
    args = parser.parse_args()
    import uvloop

    report = uvloop.run(run(args.requests, args.concurrency, args.rounds))
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
