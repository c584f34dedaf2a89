"""A redis-server child process on a loopback port, for the fleet tests and benchmark."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from rollguard.proxy.fleet.connection import RedisTarget
from rollguard.proxy.process import free_port

START_TIMEOUT_S = 10.0


class RedisServer:
    """One redis-server process; `stop()` and `start()` again keep its port and data."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def target(self) -> RedisTarget:
        return RedisTarget.parse(self.url, {})

    def start(self, *, persist: bool = True) -> None:
        """Start (or restart) the server; with `persist` every write is fsynced to its
        append-only file, so a restart keeps the data."""
        assert self.process is None, "already running"
        log = self.directory / "redis.log"
        # Loopback only, no snapshots; the append-only file is what survives a restart.
        self.process = subprocess.Popen(
            [
                self.binary,
                *("--bind", "127.0.0.1", "--port", str(self.port)),
                *("--dir", str(self.directory), "--logfile", str(log)),
                *("--save", "", "--daemonize", "no"),
                *(
                    ("--appendonly", "yes", "--appendfsync", "always")
                    if persist
                    else ("--appendonly", "no")
                ),
            ],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers_ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server did not answer PING on {self.port}:\n{text}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 10 s) and wait for it to exit."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
