"""`rollguard serve --workers N`: one supervisor keeping N worker processes serving.

The supervisor imports no gateway code and binds no port. It runs N children, each the
same `serve` command with `--worker-index K` (a new interpreter, not a fork: nothing of
the supervisor's state is shared); they listen on the one data port and the one gRPC
port together (SO_REUSEPORT: the kernel spreads connections over them), worker K's admin
port is `admin_port + K`, and they agree on rollouts through fleet mode (Redis).

- A signal (SIGTERM: drain; SIGINT, or a second signal: now) is passed to every worker;
  once all have exited the supervisor exits, 0 when every one of them exited 0.
- A worker that dies on its own is restarted after a delay that doubles with each death
  in a row (`first_delay_s` up to `max_delay_s`; afresh after `STABLE_S` of serving).
- A worker that ends before it was ready `start_failures` times in a row (a registry
  that does not load, a port taken) stops the whole: exit 1, not a restart loop. One
  not ready within `start_timeout_s` (a start that hangs) is killed and counts as one.

A worker tells it is ready by writing to a pipe the supervisor passed it (`--ready-fd`),
and dies with the supervisor (PR_SET_PDEATHSIG), so a killed supervisor leaves no worker
holding the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("rollguard.workers")

READY = b"ready\n"
STABLE_S = 30.0  # a worker that served this long starts its restart delays afresh
# Loading a registry of large models takes a while; a start that takes longer than this
# is taken for hung.
START_TIMEOUT_S = 300.0
_PR_SET_PDEATHSIG = 1


class Supervisor:
    """Keeps `workers` children of `command` running until a signal; `run()` once."""

    def __init__(
        self,
        command: Sequence[str],
        workers: int,
        *,
        first_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        start_failures: int = 3,
        start_timeout_s: float = START_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`command`: the worker's argv without `--worker-index`/`--ready-fd`."""
        self.command = list(command)
        self.workers = workers
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.start_failures = start_failures
        self.start_timeout_s = start_timeout_s
        self.clock = clock
        self.restarts = 0  # workers restarted after dying on their own
        self._children: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = asyncio.Event()
        self._sent: list[int] = []  # the signals passed on, in order
        self._gave_up = False

    async def run(self) -> int:
        """Start the workers, keep them running until a signal; the exit status."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.stop, signum)
        log.info("starting %d workers", self.workers)
        try:
            statuses = await asyncio.gather(*(self._keep(k) for k in range(self.workers)))
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        failed = {k: s for k, s in enumerate(statuses) if s != 0}
        if failed and not self._gave_up:
            log.error("workers exited with %s", ", ".join(f"{k}: {s}" for k, s in failed.items()))
        log.info("all workers stopped (restarts: %d)", self.restarts)
        return 1 if self._gave_up or failed else 0

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Pass `signum` to every worker and restart none from now on."""
        self._stopping.set()
        self._sent.append(signum)
        for child in self._children.values():
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    async def _keep(self, index: int) -> int:
        """Worker `index`, restarted until the supervisor stops; its last exit status."""
        deaths = 0  # in a row, for the restart delay
        failed_starts = 0
        while True:
            child, ready = await self._spawn(index)
            exited = asyncio.ensure_future(child.wait())
            first: list[asyncio.Future[Any]] = [ready, exited]
            done, _ = await asyncio.wait(
                first, timeout=self.start_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                log.error(
                    "worker %d (pid %d) not ready within %gs; killing it",
                    index, child.pid, self.start_timeout_s,
                )  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
            was_ready = ready.done() and ready.result()
            ready.cancel()
            started = self.clock()
            if was_ready:
                log.info("worker %d (pid %d) ready", index, child.pid)
            status = await exited
            del self._children[index]
            if self._stopping.is_set():
                if status != 0:
                    log.warning("worker %d (pid %d) exited with %d", index, child.pid, status)
                return status
            if not was_ready:
                failed_starts += 1
                if failed_starts >= self.start_failures:
                    log.error(
                        "worker %d ended before it was ready %d times in a row (last status "
                        "%d); stopping all workers", index, failed_starts, status,
                    )  # fmt: skip
                    self._gave_up = True
                    self.stop(signal.SIGTERM)
                    return status or 1
            else:
                failed_starts = 0
                if self.clock() - started >= STABLE_S:
                    deaths = 0
            delay = min(self.first_delay_s * 2**deaths, self.max_delay_s)
            deaths += 1
            self.restarts += 1
            log.error(
                "worker %d (pid %d) exited unexpectedly (%s); restarting in %.1fs "
                "(restarts so far: %d)", index, child.pid, _describe(status), delay,
                self.restarts,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return 0

    async def _spawn(self, index: int) -> tuple[asyncio.subprocess.Process, asyncio.Future[bool]]:
        """Start worker `index`; the process and a future that is True once it is ready."""
        read, write = os.pipe()
        try:
            child = await asyncio.create_subprocess_exec(
                *self.command,
                *("--worker-index", str(index), "--ready-fd", str(write)),
                pass_fds=(write,),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        self._children[index] = child
        for signum in self._sent:  # a signal that came while it was being started
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)
        return child, _ready(read)


def _ready(fd: int) -> asyncio.Future[bool]:
    """A future that is True when READY arrives on `fd`, False at its end (the worker
    exited first); `fd` is closed either way."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bool] = loop.create_future()

    def readable() -> None:
        try:
            said = os.read(fd, len(READY))
        except OSError:
            said = b""
        loop.remove_reader(fd)
        os.close(fd)
        if not future.done():
            future.set_result(said == READY)

    def cancelled(done: asyncio.Future[bool]) -> None:
        if done.cancelled():
            loop.remove_reader(fd)
            os.close(fd)

    loop.add_reader(fd, readable)
    future.add_done_callback(cancelled)
    return future


def _describe(status: int) -> str:
    """An exit status as a person reads it: `status 1` or `SIGKILL`."""
    if status < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-status).name
        return f"signal {-status}"
    return f"status {status}"


def worker_command(argv: Sequence[str]) -> list[str]:
    """The argv a worker runs: this interpreter, rollguard's CLI, the supervisor's
    own arguments (`serve ... --workers N`)."""
    return [sys.executable, "-m", "rollguard.proxy.cli", *argv]


def supervise(argv: Sequence[str], workers: int) -> int:
    """Run the supervisor of `workers` workers of `rollguard <argv>` until a signal."""
    return asyncio.run(Supervisor(worker_command(argv), workers).run())


# --- in a worker -------------------------------------------------------------------------


def die_with_parent() -> None:
    """Have the kernel send this process SIGTERM when the supervisor dies (even by
    SIGKILL), so that no orphaned worker keeps serving on the shared ports. Linux only;
    elsewhere nothing."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def tell_ready(fd: int) -> None:
    """Tell the supervisor this worker serves (once, after the gateway started)."""
    try:
        os.write(fd, READY)
    finally:
        os.close(fd)
