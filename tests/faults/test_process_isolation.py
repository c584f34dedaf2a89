"""Process isolation through the real gateway: a hung model is cut off, a crashing one is
restarted, and neither costs any other model a request.

Real models built locally (serving an ONNX graph whose Loop runs as many times as its
input says, and a joblib estimator that segfaults on one input), `runtime: {isolation:
process}` in their model.yaml, the real gateway over loopback, real requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rollguard.proxy.process import GatewayProcess
from rollguard.serving.isolation import ProcessIsolated
from tests.proxy.support import Server, serve
from tests.serving.faulty_models import (
    CRASH_ON,
    HANG_VALUE,
    crashing_joblib,
    hanging_onnx,
    write_version,
)
from tests.serving.support import eventually, layers


def infer_body(*row: float) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": list(row)}]}


def isolated(server: Server, model: str) -> ProcessIsolated:
    """The version's process-isolated layer, to see its workers' process ids."""
    runner = server.running.registry.get(model, "1").runner
    return next(r for r in layers(runner) if isinstance(r, ProcessIsolated))


def gone(pid: int) -> bool:
    """No process `pid` any more, not even a zombie."""
    return not Path(f"/proc/{pid}").exists()


def zombie_children() -> list[int]:
    """This process's children that exited and were never reaped."""
    found = []
    for task in Path("/proc/self/task").iterdir():
        # A thread listed by iterdir() may end before its children file is read.
        with contextlib.suppress(FileNotFoundError):
            for pid in (task / "children").read_text().split():
                if stat_fields(int(pid))[:1] == ["Z"]:
                    found.append(int(pid))
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: its children, theirs, and so on."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):
            for child in (task / "children").read_text().split():
                found += [int(child), *descendants(int(child))]
    return found


def stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from its third field (state) on; [] once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return []


def ended(pid: int) -> bool:
    """Gone, or a zombie: it runs no more (an orphan's reaping is init's job)."""
    fields = stat_fields(pid)
    return not fields or fields[0] == "Z"


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def cpu_seconds(pid: int) -> float:
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url, json=body) as r:
        return r.status, await r.json()


async def requests_total(server: Server, http: aiohttp.ClientSession) -> dict[str, float]:
    """rollguard_requests_total by `model/version code`."""
    async with http.get(f"{server.admin_url}/metrics") as r:
        text = await r.text()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "rollguard_requests_total":
                key = f"{s.labels['model']}/{s.labels['version']} {s.labels['code']}"
                found[key] = found.get(key, 0.0) + s.value
    return found


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Path]:
    """hang/1 (process-isolated, 2 workers), crash/1 (process-isolated, 1 worker, segfaults on
    CRASH_ON) and steady/1 (the same ONNX graph on threads, as any other model)."""
    root = tmp_path / "registry"
    write_version(root, "hang", "1", hanging_onnx(), workers=2)
    write_version(root, "crash", "1", crashing_joblib("segfault"), framework="sklearn", workers=1)
    write_version(root, "steady", "1", hanging_onnx(), isolation="thread")
    yield root


@pytest.mark.slow
async def test_hung_calls_get_504_their_workers_are_killed_and_others_are_untouched(
    tmp_path: Path, registry: Path
) -> None:
    async with (
        serve(tmp_path, registry, request_timeout_s=1.0) as server,
        aiohttp.ClientSession() as http,
    ):
        hang_url = f"{server.url}/v2/models/hang/infer"
        steady_url = f"{server.url}/v2/models/steady/infer"
        before = isolated(server, "hang").worker_pids()
        assert len(before) == 2 and os.getpid() not in before

        async def steady_traffic() -> list[int]:
            statuses = []
            for i in range(100):
                status, answer = await post(http, steady_url, infer_body(0.5, float(i)))
                statuses.append(status)
                assert answer["outputs"][0]["data"] == [0.5, float(i)]
            return statuses

        # Six hung calls (pinned and routed) against two workers, other traffic beside.
        hung = [post(http, hang_url, infer_body(HANG_VALUE, 1.0)) for _ in range(3)]
        pinned = f"{server.url}/v2/models/hang/versions/1/infer"
        hung += [post(http, pinned, infer_body(HANG_VALUE, 1.0)) for _ in range(3)]
        others = asyncio.create_task(steady_traffic())
        answers = await asyncio.gather(*hung)
        steady = await others
        assert [status for status, _ in answers] == [504] * 6, answers
        assert all(set(body) == {"error"} for _, body in answers)
        assert sum("was killed" in body["error"] for _, body in answers) >= 2
        assert steady == [200] * 100  # threads of its own: never waited on hang's workers

        await eventually(lambda: all(gone(pid) for pid in before))
        await eventually(lambda: len(isolated(server, "hang").worker_pids()) == 2)
        after = isolated(server, "hang").worker_pids()
        assert not set(after) & set(before)
        served = await asyncio.gather(
            *(post(http, hang_url, infer_body(0.5, 1.0)) for _ in range(20))
        )
        assert [status for status, _ in served] == [200] * 20
        assert served[0][1]["outputs"][0]["data"] == [0.5, 1.0]

        counts = await requests_total(server, http)
        assert counts.get("hang/1 504", 0) >= 3  # the routed ones, counted against hang
        assert counts.get("steady/1 504", 0) == 0 and counts["steady/1 200"] == 100
    assert all(gone(pid) for pid in after), "the gateway left a worker running"
    assert zombie_children() == []


@pytest.mark.slow
async def test_a_crashing_worker_is_a_500_for_its_call_and_is_restarted(
    tmp_path: Path, registry: Path
) -> None:
    async with (
        serve(tmp_path, registry, request_timeout_s=20.0) as server,
        aiohttp.ClientSession() as http,
    ):
        url = f"{server.url}/v2/models/crash/infer"
        (before,) = isolated(server, "crash").worker_pids()
        status, body = await post(http, url, infer_body(CRASH_ON, 1.0))
        assert status == 500
        assert f"(pid {before}) died during the call (killed by SIGSEGV)" in body["error"]
        assert gone(before)
        # The next call waits for the new worker and is served.
        for row in ([0.5, 1.0], [-0.5, 1.0]):
            status, body = await post(http, url, infer_body(*row))
            assert status == 200, body
            assert body["outputs"][0]["data"] == [int(row[0] > 0)]
        (after,) = isolated(server, "crash").worker_pids()
        assert after != before
        counts = await requests_total(server, http)
        assert counts["crash/1 500"] == 1 and counts["crash/1 200"] == 2
        status, _ = await post(http, f"{server.url}/v2/models/steady/infer", infer_body(1.0, 2.0))
        assert status == 200
    assert gone(after)
    assert zombie_children() == []


CANARY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: crashy}
spec:
  model: crashy
  stable: "1.0.0"
  candidate: "1.1.0"
  key: header:x-user-id
  interval: 0.2s
  steps:
    - {weight: 50, hold: 1h}
    - {weight: 100}
"""


@pytest.mark.slow
async def test_a_candidate_whose_workers_keep_dying_fails_over_while_they_back_off(
    tmp_path: Path,
) -> None:
    root = tmp_path / "registry"
    healthy, always = crashing_joblib("exit"), crashing_joblib("always")
    write_version(root, "crashy", "1.0.0", healthy, framework="sklearn", workers=1)
    write_version(root, "crashy", "1.1.0", always, framework="sklearn", workers=1)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "crashy.yaml").write_text(CANARY)
    async with (
        serve(tmp_path, root, request_timeout_s=20.0, failover_poll_s=0.05) as server,
        aiohttp.ClientSession() as http,
    ):
        answers: list[tuple[int, str]] = []  # (status, the version that answered)

        async def client(c: int) -> None:
            for i in range(10_000):
                headers = {"x-user-id": f"user-{c}-{i}"}
                body = infer_body(0.5, 1.0)
                url = f"{server.url}/v2/models/crashy/infer"
                async with http.post(url, json=body, headers=headers) as r:
                    answers.append((r.status, r.headers["x-rollguard-variant"]))
                failovers = await metric_total(server, http, "rollguard_failover_requests_total")
                if failovers >= 20:
                    return

        async with asyncio.timeout(60):
            await asyncio.gather(*(client(c) for c in range(4)))
        stable = [s for s, v in answers if v == "1.0.0"]
        candidate = [s for s, v in answers if v == "1.1.0"]
        assert stable and set(stable) == {200}  # the stable never felt the candidate's crashes
        # Each crash costs the call in it, counted there (the first crash was the warm-up
        # call at load, which is no client's and counts against nothing).
        assert candidate.count(500) >= 1
        assert set(candidate) <= {500, 503}
        counts = await requests_total(server, http)
        assert counts.get("crashy/1.0.0 500", 0) == 0
        assert counts["crashy/1.1.0 500"] == candidate.count(500)
        async with http.get(f"{server.admin_url}/metrics") as r:
            text = await r.text()
        reasons = {
            s.labels.get("reason")
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "rollguard_failover_requests_total" and s.value
        }
        assert reasons == {"unready"}  # its share went to the stable while it backed off
        print(f"\n{len(stable)} stable 200s; candidate {len(candidate)}: "
              f"{candidate.count(500)} x 500, {candidate.count(503)} x 503")  # fmt: skip


async def metric_total(server: Server, http: aiohttp.ClientSession, name: str) -> float:
    async with http.get(f"{server.admin_url}/metrics") as r:
        text = await r.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


@pytest.mark.slow
async def test_a_gateway_killed_mid_call_leaves_no_worker_running(
    tmp_path: Path, registry: Path
) -> None:
    (tmp_path / "policies").mkdir()
    env = {**os.environ, "ROLLGUARD_ADMIN_AUTH": "none", "ROLLGUARD_REQUEST_TIMEOUT_S": "300"}
    gateway = GatewayProcess(
        registry=registry,
        policies=tmp_path / "policies",
        state=tmp_path / "state",
        log=tmp_path / "gateway.log",
        env=env,
    )
    family: list[int] = []
    try:
        async with aiohttp.ClientSession() as http:
            await gateway.wait_ready(http)
            family += descendants(gateway.proc.pid)  # fork server, its workers, tracker
            assert len(family) >= 4, family
            spent = {pid: cpu_seconds(pid) for pid in family}
            hung = asyncio.create_task(
                post(http, f"{gateway.url}/v2/models/hang/infer", infer_body(HANG_VALUE, 1.0))
            )
            # A worker computing the hung call: the one whose CPU time climbs.
            await eventually(lambda: any(cpu_seconds(p) > spent[p] + 0.3 for p in family))
            gateway.kill()  # SIGKILL: no shutdown code runs in the gateway
            await eventually(lambda: all(ended(pid) for pid in family))
            hung.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await hung
    finally:
        gateway.kill()
        for pid in family:  # only when it failed: what this test started, left running
            if not ended(pid) and b"multiprocessing" in cmdline(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


async def test_a_misspelt_isolation_is_refused_naming_the_field(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    directory = write_version(root, "typo", "1", hanging_onnx(), isolation="processes")
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("rollguard")),
        "registry",
        "--registry",
        str(root),
        "verify",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 1
    assert str(directory / "model.yaml") in out.decode()
    assert (
        "runtime: Value error, isolation 'processes': expected 'thread' or 'process'"
        in out.decode()
    )
