"""`rollguard serve` as a child process on loopback: start, wait until ready, stop.

Shared by `rollguard demo`, the load-test scenarios and the restart tests, which all
need a real gateway process they can kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp


class GatewayExited(RuntimeError):
    """The gateway process ended, or was not ready in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_run(count: int) -> int:
    """The first of `count` consecutive loopback ports free right now, below the
    ephemeral range: `serve --workers N` listens on admin_port..admin_port + N - 1, and a
    port inside that range may be taken at any moment as the local end of an outgoing
    connection (to Redis, to an upstream, a load generator's), as a worker restarted later
    must bind it again."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(max(low - 12000, 1024), low - count)
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    raise RuntimeError(f"no run of {count} free loopback ports below {low}")


class GatewayProcess:
    """One `python -m proxy.cli serve` child, its output appended to `log`."""

    def __init__(
        self,
        *,
        registry: Path,
        policies: Path,
        state: Path | str,  # a directory, or a fleet's redis://host:port/db
        log: Path,
        port: int | None = None,
        admin_port: int | None = None,
        grpc_port: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        drain_delay_s: float = 0.0,
    ) -> None:
        """`drain_delay_s`: how long a SIGTERM keeps serving while not ready (0: stop at
        once, what tests and the demo want); ROLLGUARD_DRAIN_DELAY_S in `env` wins.

        Admin needs a token: unless `env` gives ROLLGUARD_ADMIN_TOKEN or asks for
        ROLLGUARD_ADMIN_AUTH, a random one is made for this process (`admin_headers`)."""
        base = dict(os.environ if env is None else env)
        if not base.get("ROLLGUARD_ADMIN_TOKEN") and not base.get("ROLLGUARD_ADMIN_AUTH"):
            base["ROLLGUARD_ADMIN_TOKEN"] = secrets.token_urlsafe(32)
        self.admin_token = base.get("ROLLGUARD_ADMIN_TOKEN") or None
        self.port = port or free_port()
        self.admin_port = admin_port or free_port()
        self.grpc_port = grpc_port or free_port()  # the V2 gRPC API
        self.url = f"http://127.0.0.1:{self.port}"  # the data port
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.log = log
        command = [
            sys.executable, "-m", "rollguard.proxy.cli", "serve",
            "--registry", str(registry), "--policies", str(policies), "--state", str(state),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--admin-port", str(self.admin_port), "--grpc-port", str(self.grpc_port),
        ]  # fmt: skip
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                command,
                cwd=cwd,
                env={"ROLLGUARD_DRAIN_DELAY_S": f"{drain_delay_s:g}", **base},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def admin_headers(self) -> dict[str, str]:
        """The Authorization header the admin port wants (none with admin_auth none)."""
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    async def wait_ready(self, http: aiohttp.ClientSession, limit_s: float = 60.0) -> None:
        """Return once /v2/health/ready answers 200; GatewayExited otherwise."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise GatewayExited(
                    f"the gateway exited with status {self.proc.returncode}; see {self.log}"
                )
            try:
                async with http.get(f"{self.url}/v2/health/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise GatewayExited(f"the gateway was not ready within {limit_s:g}s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (crash tests)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> None:
        """SIGTERM without waiting: the graceful shutdown (drain, grace) runs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    async def wait_exit(self, limit_s: float = 30.0) -> int:
        """The exit status, once the process has ended; GatewayExited after `limit_s`."""
        deadline = time.monotonic() + limit_s
        while (status := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise GatewayExited(f"the gateway did not exit within {limit_s:g}s")
            await asyncio.sleep(0.05)
        return status

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
