"""One worker process, seen from the gateway: start it, send it a call, kill it, reap it.

`WorkerProcess.start` forks a worker from multiprocessing's fork server (a clean,
single-threaded process that imported the worker's code once, so a start costs a fork
and the model's load, not a fresh interpreter), hands it the version's verified bytes
and waits until it has loaded them. `call` sends one call and gives a future that
settles with the answer, with the error the worker reported, with `DeadlineExceeded`
when the call outlives its deadline (the worker is then killed, SIGKILL), or with the
error of the worker's death; the pool that owns it (serving/isolation.py) reads its
answers (`read_answer`) and reaps it (`reaped`). The worker's own side, and the wire,
are serving/worker.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import threading
from functools import partial
from multiprocessing.process import BaseProcess
from typing import Any

from rollguard.serving.errors import ArtifactError, DeadlineExceeded, ServingError
from rollguard.serving.tensors import Tensors
from rollguard.serving.worker import (
    HEADER,
    MAX_MESSAGE,
    WireError,
    decode_answer,
    encode,
    error_of,
    pack,
    serve,
    unpack,
)

START_TIMEOUT_S = 120.0  # a worker's start and load; a load that takes longer is refused
_EXIT_WAIT_S = 2.0  # for a worker whose socket closed to be reaped, before it is killed

_CONTEXT = multiprocessing.get_context("forkserver")
_START_LOCK = threading.Lock()  # multiprocessing's table of children is not thread-safe


def _start_process(sock: socket.socket, name: str) -> BaseProcess:
    """A worker process serving on `sock` (blocking: it may start the fork server)."""
    with _START_LOCK:
        # Takes effect when the fork server starts (the first worker); then a no-op.
        _CONTEXT.set_forkserver_preload(_preload())
        process = _CONTEXT.Process(target=serve, args=(sock, os.getpid()), name=name, daemon=True)
        process.start()
    return process


def _preload() -> list[str]:
    """What the fork server imports once for every worker: the worker's code, and the
    main module, which multiprocessing runs again in each child it starts (for
    `rollguard serve`, the whole gateway): imported once, each worker's run of it finds
    every import done. A script run by path is preloaded as `__main__`, one run with
    `-m` by its module name."""
    modules = ["__main__", "rollguard.serving.worker"]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if isinstance(name, str) and not name.endswith("__main__"):
        modules.append(name)
    return modules


def describe(exit_code: int | None) -> str:
    """How a worker ended, for a log line or an error."""
    if exit_code is None:
        return "it did not exit and was killed"
    if exit_code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exit_code).name}"
        return f"killed by signal {-exit_code}"
    return f"exit code {exit_code}"


async def read_answer(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    """A worker's next message (asyncio.IncompleteReadError once it is gone, WireError
    when it is not a message it may send)."""
    (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if length > MAX_MESSAGE:
        raise WireError(f"an answer of {length} bytes, over the {MAX_MESSAGE} limit")
    return decode_answer(await reader.readexactly(length))


class WorkerProcess:
    """One worker process and its socket; at most one call in it at a time."""

    def __init__(
        self, process: BaseProcess, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.process = process
        self.pid: int = process.pid or 0
        self.reader = reader
        self.writer = writer
        self.pending: asyncio.Future[Tensors] | None = None  # the call computing in it
        self.timer: asyncio.TimerHandle | None = None  # kills it at the call's deadline
        self.overdue = ""  # why it was killed at a deadline, once it was
        self.calls = 0  # calls sent to it

    @classmethod
    async def start(cls, name: str, load: bytes) -> WorkerProcess:
        """A worker that has loaded the version; ArtifactError with the reason when the
        load fails in it (the worker is gone by then)."""
        parent, child = socket.socketpair()
        loop = asyncio.get_running_loop()
        starting = loop.run_in_executor(None, _start_process, child, name)
        try:
            process = await asyncio.shield(starting)
        except asyncio.CancelledError:  # unloaded while starting: end what starts anyway.
            # The thread is still handing `child` to the fork server: closed under it, the
            # hand-over fails, the fork server dies of it and reaps no worker any more.
            starting.add_done_callback(partial(_end_started, child))
            parent.close()
            raise
        except BaseException:  # the thread failed to start it: it is done with `child`
            child.close()
            parent.close()
            raise
        child.close()
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(sock=parent)
            writer.write(load)
            async with asyncio.timeout(START_TIMEOUT_S):
                answer = await read_answer(reader)
        except BaseException as exc:
            _kill(process)
            if writer is not None:
                writer.close()
            else:
                parent.close()
            code = await reaped(process)
            if isinstance(exc, asyncio.IncompleteReadError | ConnectionError):
                raise ArtifactError(
                    f"its worker process died while loading it ({describe(code)})"
                ) from None
            if isinstance(exc, TimeoutError):
                raise ArtifactError(
                    f"its worker process did not load it within {START_TIMEOUT_S:g}s"
                ) from None
            if isinstance(exc, Exception):
                raise ArtifactError(f"its worker process failed to start: {exc}") from None
            raise
        worker = cls(process, reader, writer)
        if answer[0] != "ready":
            await worker.close()
            raise ArtifactError(str(answer[1]) if len(answer) > 1 else "its load failed")
        return worker

    def call(self, inputs: Tensors, deadline: float, overdue: str) -> asyncio.Future[Tensors]:
        """Send one call; the future settles with its answer, or the error of the
        worker's death or of the deadline (when the worker is killed)."""
        message = encode(("call", pack(inputs)))
        self.calls += 1
        loop = asyncio.get_running_loop()
        self.pending = loop.create_future()
        self.timer = loop.call_at(deadline, self._kill_overdue, overdue)
        self.writer.write(message)
        return self.pending

    def settle(self, answer: tuple[Any, ...]) -> None:
        """The worker's answer to the call in it (WireError: not an answer)."""
        pending, self.pending = self.pending, None
        self._stop_timer()
        if pending is None:
            raise WireError(f"an unasked-for {answer[0]!r} message")
        if answer[0] == "ok" and len(answer) == 2:
            outcome: Tensors | ServingError = unpack(answer[1])
        elif answer[0] == "error" and len(answer) == 3:
            outcome = error_of(answer[1], answer[2])
        else:
            raise WireError(f"an answer tagged {answer[0]!r}")
        if pending.done():
            return  # its caller gave up; the worker is free again all the same
        if isinstance(outcome, ServingError):
            pending.set_exception(outcome)
        else:
            pending.set_result(outcome)

    def fail(self, error: ServingError) -> None:
        """End the call in it, if any, with `error` (the worker is lost)."""
        pending, self.pending = self.pending, None
        self._stop_timer()
        if pending is not None and not pending.done():
            pending.set_exception(error)

    def kill(self) -> None:
        """SIGKILL it unless it has already ended (its pid may be reused once reaped),
        and close its socket."""
        _kill(self.process)
        self.writer.close()

    async def close(self) -> int | None:
        """Kill it, wait until it is reaped, release its handles; its exit code."""
        self.kill()
        return await reaped(self.process)

    def _kill_overdue(self, why: str) -> None:
        self.timer = None
        self.overdue = why
        self.kill()
        self.fail(DeadlineExceeded(f"{why}; its worker process (pid {self.pid}) was killed"))

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _end_started(child: socket.socket, starting: asyncio.Future[BaseProcess]) -> None:
    """A start given up: once its thread is done with the child's socket, close it and
    kill the process if one started."""
    child.close()
    if not starting.cancelled() and starting.exception() is None:
        _kill(starting.result())


def _kill(process: BaseProcess) -> None:
    """SIGKILL unless it has ended: once reaped, its pid may be another process's."""
    with contextlib.suppress(OSError, ValueError):
        if process.exitcode is None:
            process.kill()


async def reaped(process: BaseProcess) -> int | None:
    """Wait (bounded) until the fork server has reaped `process`; its exit code, or
    None when it had to be killed after `_EXIT_WAIT_S`."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    sentinel = process.sentinel

    def on_exit() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(sentinel, on_exit)
    code: int | None = None
    try:
        async with asyncio.timeout(_EXIT_WAIT_S):
            await ended
        process.join(0)
        code = process.exitcode
    except TimeoutError:
        _kill(process)
        await asyncio.to_thread(process.join, _EXIT_WAIT_S)
    finally:
        loop.remove_reader(sentinel)
    if process.exitcode is not None:
        process.close()
    return code
