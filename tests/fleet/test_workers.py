"""`rollguard serve --workers N` end to end: the real CLI on loopback, a real
redis-server; both workers answer on the one data port, one of them decides, a killed
worker is restarted, SIGTERM stops them all; and the supervisor on its own."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from load_tests.redis_server import RedisServer
from rollguard.proxy.process import free_port, free_port_run
from rollguard.proxy.workers import Supervisor
from tests.fleet.support import (
    ROW,
    TOKEN,
    admin_get,
    assert_no_traceback,
    audit_entries,
    canary_policy,
    serve_env,
    until,
    upstream,
    write_policy,
)
from tests.proxy.test_cli import cli

POLICY = canary_policy("1s")


@dataclass
class Served:
    """A `serve --workers N` supervisor started by a test, and where it listens."""

    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    workers: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def admin_url(self, worker: int) -> str:
        return f"http://127.0.0.1:{self.admin_port + worker}"

    def children(self) -> set[int]:
        """The supervisor's child processes now (Linux /proc)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return {int(p) for p in path.read_text().split()}
        except FileNotFoundError:
            return set()


async def _pid(http: aiohttp.ClientSession, served: Served, worker: int) -> int | None:
    """The pid of the worker on admin port admin_port + worker (fleet.process is
    host/pid/random), None while nothing answers there."""
    try:
        doc = await admin_get(http, f"{served.admin_url(worker)}/admin/rollouts")
    except aiohttp.ClientError:
        return None
    return int(doc["fleet"]["process"].split("/")[1])


async def _requests_served(http: aiohttp.ClientSession, served: Served, worker: int) -> int:
    """Infer requests worker `worker` has answered 200, from its own /metrics."""
    async with http.get(f"{served.admin_url(worker)}/metrics") as r:
        text = await r.text()
    found = re.findall(r'^rollguard_requests_total\{[^}]*code="200"[^}]*\} (\S+)$', text, re.M)
    return int(sum(float(n) for n in found))


def _launch(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


@asynccontextmanager
async def _serve(
    tmp_path: Path, redis_server: RedisServer, workers: int = 2
) -> AsyncIterator[Served]:
    """`rollguard serve --workers N` as a user runs it, every worker ready; stopped with
    SIGTERM at the end, which must end the supervisor and every worker with status 0."""
    registry, policies = tmp_path / "registry", write_policy(tmp_path, POLICY)
    port, grpc_port, admin_port = free_port_run(1), free_port_run(1), free_port_run(workers)
    env = serve_env({"ROLLGUARD_DRAIN_DELAY_S": "0"})
    log = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "rollguard.proxy.cli", "serve", "--workers", str(workers),
        "--registry", str(registry), "--policies", str(policies), "--state", redis_server.url,
        "--port", str(port), "--admin-port", str(admin_port), "--grpc-port", str(grpc_port),
    ]  # fmt: skip
    served = Served(_launch(command, env, log), port, admin_port, workers, log)
    proc = served.proc
    stopped = False
    try:
        async with aiohttp.ClientSession() as http:

            async def all_ready() -> bool:
                assert proc.poll() is None, log.read_text()[-3000:]
                pids = [await _pid(http, served, k) for k in range(workers)]
                return None not in pids

            await until(all_ready, 60.0)
        yield served
        proc.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(proc.wait, 30)
        stopped = True
        assert status == 0, log.read_text()[-3000:]
        assert served.children() == set()
    finally:
        if not stopped and proc.poll() is None:
            proc.kill()  # the workers follow it (PR_SET_PDEATHSIG)
            proc.wait(10)
    assert_no_traceback(log)


async def _drive(
    http: aiohttp.ClientSession, url: str, stop: asyncio.Event, outcomes: dict[str, int]
) -> None:
    """Requests on new connections (the kernel picks a worker per connection), four at
    a time, until `stop`; counted by outcome in `outcomes`."""

    async def one() -> None:
        while not stop.is_set():
            try:
                async with http.post(
                    f"{url}/v2/models/remote/infer",
                    data=ROW,
                    headers={"content-type": "application/json", "connection": "close"},
                ) as r:
                    await r.read()
                    key = str(r.status)
            except aiohttp.ClientError:
                key = "lost"
            outcomes[key] = outcomes.get(key, 0) + 1

    await asyncio.gather(*(one() for _ in range(4)))


pytestmark = pytest.mark.slow


async def test_two_workers_share_the_data_port_and_decide_the_rollout_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with (
        upstream(tmp_path / "registry"),
        _serve(tmp_path, redis_server) as served,
        aiohttp.ClientSession() as http,
    ):
        pids = [await _pid(http, served, k) for k in range(2)]
        assert len(set(pids)) == 2 and set(pids) == served.children(), (pids, served.children())
        stop, outcomes = asyncio.Event(), dict[str, int]()
        driving = asyncio.create_task(_drive(http, served.url, stop, outcomes))

        async def promoted() -> bool:
            docs = [
                await admin_get(http, f"{served.admin_url(k)}/admin/rollouts/remote")
                for k in (0, 1)
            ]
            return all(d["phase"] == "promoted" for d in docs)

        try:
            await until(promoted, 60.0)
        finally:
            stop.set()
            await driving
        assert set(outcomes) == {"200"}, outcomes
        # The one data port reached both processes.
        counts = [await _requests_served(http, served, k) for k in (0, 1)]
        print(f"\nrequests answered per worker: {counts}")
        assert all(n > 0 for n in counts), counts
        assert sum(counts) == outcomes["200"]
        entries = await audit_entries(redis_server)
        decisions = [e["data"]["action"] for e in entries if e["kind"] == "decision"]
        # Each step decided once, by one of the two: none lost, none doubled.
        assert decisions == ["advance", "promote"], decisions
        assert [e["kind"] for e in entries].count("start") == 1
        deciding = [(await admin_get(http, f"{served.admin_url(k)}/admin/rollouts"))["fleet"]
                    ["deciding"] for k in (0, 1)]  # fmt: skip
        assert sorted(deciding) == [[], ["remote"]], deciding


async def test_a_killed_worker_is_restarted_and_traffic_keeps_flowing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with (
        upstream(tmp_path / "registry"),
        _serve(tmp_path, redis_server) as served,
        aiohttp.ClientSession() as http,
    ):
        stop, outcomes = asyncio.Event(), dict[str, int]()
        driving = asyncio.create_task(_drive(http, served.url, stop, outcomes))
        try:

            async def both_serve() -> bool:
                return all([await _requests_served(http, served, k) > 0 for k in (0, 1)])

            await until(both_serve, 20.0)
            killed = await _pid(http, served, 1)
            assert killed is not None
            os.kill(killed, signal.SIGKILL)
            at_kill = dict(outcomes)
            restarted: list[int | None] = []

            async def back() -> bool:
                restarted[:] = [await _pid(http, served, 1)]
                return restarted[0] not in (None, killed)

            await until(back, 30.0)
            assert restarted[0] in served.children()

            async def serving_again() -> bool:
                return await _requests_served(http, served, 1) > 0

            await until(serving_again, 20.0)
            after = dict(outcomes)
        finally:
            stop.set()
            await driving
        # Requests kept being answered while worker 1 was down: by worker 0.
        assert after.get("200", 0) > at_kill.get("200", 0)
        # Only connections the kernel had queued for the killed worker can be lost.
        assert outcomes.get("200", 0) > 10 * outcomes.get("lost", 0), outcomes
        assert set(outcomes) <= {"200", "lost"}, outcomes
    text = served.log.read_text()
    assert re.search(r"worker 1 \(pid \d+\) exited unexpectedly \(SIGKILL\); restarting", text)
    assert "(restarts so far: 1)" in text


def test_workers_with_a_state_directory_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "registry").mkdir()
    done = cli(
        "serve", "--workers", "2", "--registry", str(tmp_path / "registry"),
        "--state", str(tmp_path / "state"), "--port", str(free_port()),
        env={"ROLLGUARD_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("rollguard: --workers 2 needs fleet mode: set state: redis://")
    assert not (tmp_path / "state").exists()


def test_workers_sharing_a_port_with_their_admin_ports_are_refused(tmp_path: Path) -> None:
    (tmp_path / "registry").mkdir()
    admin = free_port_run(3)
    done = cli(
        "serve", "--workers", "3", "--registry", str(tmp_path / "registry"),
        "--state", "redis://127.0.0.1:1/0", "--port", str(admin + 2),
        "--admin-port", str(admin), "--grpc-port", str(free_port()),
        env={"ROLLGUARD_ADMIN_TOKEN": TOKEN},
    )  # fmt: skip
    assert done.returncode == 1
    assert f"take --port {admin + 2}; pick another --admin-port" in done.stderr


async def test_a_worker_that_never_gets_ready_stops_the_supervisor(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker that exits before it is ready, three times running: exit 1, no loop."""
    command = [sys.executable, "-c", "import sys; sys.exit(3)"]
    supervisor = Supervisor(command, 2, first_delay_s=0.01)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, "rollguard.workers"):
        status = await asyncio.wait_for(supervisor.run(), 30)
    assert status == 1
    assert time.monotonic() - started < 30
    assert "ended before it was ready 3 times in a row (last status 3)" in caplog.text


async def test_a_worker_whose_start_hangs_is_killed_and_counts_as_a_failed_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker that neither gets ready nor exits (a start that hangs) is killed after
    start_timeout_s and counted: two in a row stop the supervisor with exit 1."""
    command = [sys.executable, "-c", "import time; time.sleep(600)"]
    supervisor = Supervisor(command, 1, first_delay_s=0.01, start_failures=2, start_timeout_s=1.0)
    with caplog.at_level(logging.INFO, "rollguard.workers"):
        status = await asyncio.wait_for(supervisor.run(), 60)
    assert status == 1
    assert caplog.text.count("not ready within 1s; killing it") == 2
    assert "ended before it was ready 2 times in a row (last status -9)" in caplog.text
