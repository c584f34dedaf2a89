"""Graceful shutdown: SIGTERM turns readiness to 503 while the data port keeps serving
for `drain_delay_s`, then the listener closes, requests in flight finish within
`shutdown_grace_s` (the ones that cannot are answered 503) and the process exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from rollguard.proxy.process import GatewayProcess
from tests.proxy.rawhttp import address, closed, connect, exchange, get, post, read, until
from tests.proxy.support import serve, start_upstream, write_remote_version

REMOTE = "/v2/models/remote/infer"


def _remote_row(request_id: str) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}
    return orjson.dumps({"id": request_id, "inputs": [tensor]})


@contextlib.asynccontextmanager
async def _sleepy_upstream(
    registry: Path, seconds: float, entered: list[str]
) -> AsyncIterator[None]:
    """`remote/1`: a `framework: http` version whose stand-in upstream answers each infer
    after `seconds` (or once the context ends); `entered` gets each request's id as it
    arrives."""
    ending = asyncio.Event()

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def infer(request: web.Request) -> web.Response:
        doc = await request.json()
        entered.append(doc.get("id", ""))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ending.wait(), seconds)
        tensor = {"name": "y", "datatype": "FP32", "shape": [1], "data": [1.0]}
        return web.json_response({"model_name": "remote", "id": doc.get("id"), "outputs": [tensor]})

    app = web.Application()
    app.router.add_get("/v2/models/remote/versions/1/ready", ready)
    app.router.add_post("/v2/models/remote/versions/1/infer", infer)
    runner, base = await start_upstream(app)
    write_remote_version(registry, "1", f"{base}/v2/models/remote/versions/1")
    try:
        yield
    finally:
        ending.set()
        await runner.cleanup()


def _gateway(tmp_path: Path, registry: Path, env: dict[str, str]) -> GatewayProcess:
    """`rollguard serve` of `registry` with no policies, its log in tmp_path/gateway.log."""
    (tmp_path / "policies").mkdir()
    return GatewayProcess(
        registry=registry, policies=tmp_path / "policies", state=tmp_path / "state",
        log=tmp_path / "gateway.log", env=env,
    )  # fmt: skip


async def _status(url: str) -> int | None:
    """Readiness on a fresh connection: its status, or None when nothing listens."""
    try:
        return (await exchange(url, get("/v2/health/ready"))).status
    except (ConnectionError, OSError):
        return None


@pytest.mark.slow
async def test_sigterm_with_8s_requests_in_flight_answers_them_all(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    entered: list[str] = []
    env = {**os.environ, "ROLLGUARD_DRAIN_DELAY_S": "2", "ROLLGUARD_SHUTDOWN_GRACE_S": "20",
           "ROLLGUARD_REQUEST_TIMEOUT_S": "30", "ROLLGUARD_ADMIN_AUTH": "none"}  # fmt: skip
    async with _sleepy_upstream(registry, 8.0, entered):
        gateway = _gateway(tmp_path, registry, env)
        try:
            async with aiohttp.ClientSession() as http:
                await gateway.wait_ready(http)
            url = gateway.url
            streams = [await asyncio.open_connection(*address(url)) for _ in range(8)]
            for i, (_, w) in enumerate(streams):
                w.write(post(REMOTE, _remote_row(f"slow-{i}")))
            await until(lambda: len(entered) == 8, limit_s=10.0)
            terminated = time.monotonic()
            gateway.terminate()
            # Readiness turns 503 at once while the listener still answers.
            seen: list[tuple[float, int | None]] = []
            while (status := await _status(url)) is not None:
                seen.append((time.monotonic() - terminated, status))
                await asyncio.sleep(0.05)
            closed_after = time.monotonic() - terminated
            statuses = [s for _, s in seen]
            assert 503 in statuses, seen
            first_503 = next(t for t, s in seen if s == 503)
            print(f"\nreadiness 503 after {first_503:.3f}s, listener closed after "
                  f"{closed_after:.2f}s, {len(seen)} readiness answers")  # fmt: skip
            assert first_503 < 1.5 and closed_after >= 1.8, (first_503, closed_after)
            assert 200 not in statuses[statuses.index(503) :]  # never ready again
            # Every request in flight is answered, 200, then its connection closes.
            for i, (r, _) in enumerate(streams):
                answer = await read(r, timeout_s=30.0)
                assert (answer.status, answer.json()["id"]) == (200, f"slow-{i}")
                assert answer.headers["connection"] == "close"
                assert await closed(r)
            assert await gateway.wait_exit(30.0) == 0
            for _, w in streams:
                w.close()
        finally:
            gateway.kill()
        text = (tmp_path / "gateway.log").read_text()
        assert "Traceback" not in text, text[-3000:]


async def test_a_sigterm_as_the_data_port_opens_stops_the_gateway_gracefully(
    tmp_path: Path,
) -> None:
    """The data port opens last, once the admin and gRPC ports listen, and a SIGTERM
    that comes as soon as it answers (the signal handlers are in place before any port
    opens) ends in a drain and exit 0, not in death by the signal."""
    registry = tmp_path / "registry"
    entered: list[str] = []
    env = {**os.environ, "ROLLGUARD_DRAIN_DELAY_S": "0", "ROLLGUARD_ADMIN_AUTH": "none"}
    async with _sleepy_upstream(registry, 0.0, entered):
        gateway = _gateway(tmp_path, registry, env)
        try:
            deadline = time.monotonic() + 60
            while (status := await _status(gateway.url)) is None:
                assert gateway.proc.poll() is None, "the gateway exited while starting"
                assert time.monotonic() < deadline, "the data port never opened"
                await asyncio.sleep(0.002)
            for port in (gateway.admin_port, gateway.grpc_port):  # already listening
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
            gateway.terminate()
            assert status in (200, 503)
            assert await gateway.wait_exit(30.0) == 0
        finally:
            gateway.kill()
        text = (tmp_path / "gateway.log").read_text()
        assert "Traceback" not in text, text[-3000:]


async def test_during_the_drain_delay_new_requests_are_served_and_told_to_reconnect(
    tmp_path: Path,
) -> None:
    registry = tmp_path / "registry"
    entered: list[str] = []
    async with (
        _sleepy_upstream(registry, 0.2, entered),
        serve(tmp_path, registry, drain_delay_s=30.0) as server,
        connect(server.url) as (r, w),
    ):
        w.write(get("/v2/health/live"))
        assert (await read(r)).headers.get("connection") != "close"
        draining = asyncio.create_task(server.running.drain())
        await until(lambda: server.running.data_plane.draining)
        assert (await exchange(server.url, get("/v2/health/ready"))).status == 503
        # A kept-alive connection is answered, with Connection: close.
        w.write(post(REMOTE, _remote_row("during")))
        answer = await read(r)
        assert (answer.status, answer.json()["id"]) == (200, "during")
        assert answer.headers["connection"] == "close" and await closed(r)
        # New connections are still taken and served.
        answer = await exchange(server.url, post(REMOTE, _remote_row("new")))
        assert (answer.status, answer.headers["connection"]) == (200, "close")
        assert not draining.done()
        server.running.hurry()  # a second SIGTERM ends the delay
        await asyncio.wait_for(draining, 5.0)


async def test_past_the_grace_running_requests_get_503_and_queued_ones_too(
    tmp_path: Path,
) -> None:
    registry = tmp_path / "registry"
    entered: list[str] = []
    async with (
        _sleepy_upstream(registry, 30.0, entered),
        serve(tmp_path, registry, shutdown_grace_s=0.5) as server,
        connect(server.url) as (r, w),
    ):
        w.write(post(REMOTE, _remote_row("stuck")) + get("/v2/health/live"))
        await until(lambda: entered == ["stuck"])
        await asyncio.wait_for(server.running.close(), 5.0)
        answer = await read(r)
        assert (answer.status, answer.headers["retry-after"]) == (503, "1")
        assert "shutting down" in answer.json()["error"]
        answer = await read(r)  # the one queued behind it never ran
        assert answer.status == 503 and answer.headers["connection"] == "close"
        assert await closed(r)
        assert server.running.data_plane.inflight == 0


async def _504_then_sigterm(tmp_path: Path, registry: Path, model: str, row: Any) -> str:
    """A call of `model` past `request_timeout_s` (1 s) is answered 504, then SIGTERM:
    the gateway must exit 0; its log."""
    env = {**os.environ, "ROLLGUARD_REQUEST_TIMEOUT_S": "1", "ROLLGUARD_ADMIN_AUTH": "none"}
    gateway = _gateway(tmp_path, registry, env)
    try:
        async with aiohttp.ClientSession() as http:
            await gateway.wait_ready(http)
            tensor = {"name": "input", "datatype": "FP32", "shape": list(row.shape)}
            body = {"inputs": [{**tensor, "data": row.ravel().tolist()}]}
            async with http.post(f"{gateway.url}/v2/models/{model}/infer", json=body) as r:
                assert r.status == 504, await r.text()
        gateway.terminate()
        assert await gateway.wait_exit(30.0) == 0
    finally:
        gateway.kill()
    text = (tmp_path / "gateway.log").read_text()
    assert "terminate called" not in text and "Traceback" not in text, text[-3000:]
    return text


@pytest.mark.slow
async def test_an_onnx_call_past_its_deadline_is_stopped_and_the_gateway_exits_cleanly(
    tmp_path: Path,
) -> None:
    """A call of about 30 s of ONNX Loop, past its deadline, is answered 504 and stopped
    by ONNX Runtime's terminate flag (no thread computes on for nobody); SIGTERM then
    exits 0 with no model call left running."""
    from tests.faults import models

    registry = tmp_path / "registry"
    data = models.onnx_bytes(models.with_loop(models.onnx_model(models.logistic())))
    models.write_version(registry, "loop", "1", "model.onnx", data)
    row = models.rows()[:1].copy()
    row[0, 0] = 30.0 / models.seconds_per_trip(data)  # about 30 s of Loop
    text = await _504_then_sigterm(tmp_path, registry, "loop", row)
    assert "Exiting due to terminate flag" in text, text[-2000:]
    assert "still running past their deadline" not in text, text[-2000:]


@pytest.mark.slow
async def test_sigterm_with_a_model_call_stuck_past_its_deadline_exits_cleanly(
    tmp_path: Path,
) -> None:
    """A scikit-learn call that cannot be stopped (it hangs for a minute) is answered 504
    while its thread waits on; stopping the gateway then exits 0 and says what it left
    running, without waiting for it."""
    from tests.faults import models

    registry = tmp_path / "registry"
    data = models.joblib_bytes(models.hanging())
    models.write_version(registry, "hung", "1", "model.joblib", data)
    text = await _504_then_sigterm(tmp_path, registry, "hung", models.rows()[:1])
    assert "model call(s) still running past their deadline: model hung/1" in text, text[-2000:]
