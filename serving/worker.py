"""A worker process's side of process isolation, and the wire both sides speak.

A worker (serving/isolation.py starts it) serves one version: it receives the version's
manifest and verified bytes (`PinnedBytes`, never a path to read again), loads them with
the framework's own runner, and then answers one call at a time until its socket closes,
when it exits. Every answer names what happened: `ok` with the outputs, or `error` with
the kind of serving error the model raised and its message.

The wire is one socket pair. A message is an 8-byte little-endian length, then a pickle
of a tagged tuple. Tensors travel as plain values (`pack`: name, dtype, shape and raw
bytes each; the items themselves for object arrays), not as pickled numpy objects, which
cost three times as much to pickle. The parent trusts nothing a worker sends it (the
point of a worker is that it may misbehave): `decode_answer` unpickles with no globals
at all, so an answer holds strings, numbers, bytes and containers and nothing that runs
code in the gateway, and `unpack` checks every array it rebuilds.
"""

from __future__ import annotations

import asyncio
import io
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
from typing import Any

import numpy as np

from rollguard.serving.errors import InvalidInput, ModelExecutionError, NotReady, ServingError
from rollguard.serving.hashing import PinnedBytes
from rollguard.serving.manifest import Manifest
from rollguard.serving.tensors import Tensors

HEADER = struct.Struct("<Q")
MAX_MESSAGE = 1 << 31  # one answer of more than 2 GiB is a model fault, not an answer

# The serving errors a worker may report by name; any other kind is the model's fault.
_ERRORS: dict[str, type[ServingError]] = {
    "InvalidInput": InvalidInput,
    "NotReady": NotReady,
    "ModelExecutionError": ModelExecutionError,
}
Packed = list[tuple[str, str, tuple[int, ...], Any]]


class WireError(Exception):
    """A message that is not what the other side may send."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise WireError(f"the answer names {module}.{name}; an answer holds plain values only")


def encode(message: object) -> bytes:
    """One framed message."""
    body = pickle.dumps(message, protocol=5)
    return HEADER.pack(len(body)) + body


def decode_answer(body: bytes | bytearray) -> tuple[Any, ...]:
    """A worker's message, unpickled without globals; WireError when it is not a tuple
    whose first item is a string."""
    try:
        message = _PlainUnpickler(io.BytesIO(body)).load()
    except WireError:
        raise
    except Exception as exc:  # a truncated or garbled pickle raises anything
        raise WireError(f"unreadable answer: {type(exc).__name__}: {exc}") from None
    if not (isinstance(message, tuple) and message and isinstance(message[0], str)):
        raise WireError(f"an answer is a tagged tuple, got {type(message).__name__}")
    return message


def pack(tensors: Tensors) -> Packed:
    """Tensors as plain values: (name, dtype, shape, raw bytes, or the items of an
    object array as Python values)."""
    packed: Packed = []
    for name, array in tensors.items():
        if array.dtype.kind == "O":
            items = [v.item() if isinstance(v, np.generic) else v for v in array.ravel().tolist()]
            packed.append((name, "O", array.shape, items))
        else:
            packed.append((name, array.dtype.str, array.shape, array.tobytes()))
    return packed


def unpack(value: object) -> Tensors:
    """What `pack` made, as arrays; WireError when it is anything else."""
    if not isinstance(value, list):
        raise WireError("the tensors are not a list")
    tensors: Tensors = {}
    for item in value:
        try:
            name, dtype, shape, data = item
            shape = tuple(int(d) for d in shape)
            if dtype == "O" and isinstance(data, list):
                array = np.empty(len(data), dtype=object)
                array[:] = data
            elif isinstance(data, bytes) and np.dtype(dtype).kind != "O":
                array = np.frombuffer(data, dtype=np.dtype(dtype))
            else:
                raise TypeError(f"{type(data).__name__} data for dtype {dtype!r}")
            tensors[str(name)] = array.reshape(shape)
        except Exception as exc:  # unpacking, dtype parsing, buffer size, reshape
            raise WireError(f"a tensor that cannot be rebuilt: {exc}") from None
    return tensors


def error_of(kind: object, text: object) -> ServingError:
    """The serving error a worker reported, as the same type in the gateway."""
    error = _ERRORS.get(kind) if isinstance(kind, str) else None
    return (error or ModelExecutionError)(str(text))


# --- the worker process -------------------------------------------------------------


def serve(sock: socket.socket, gateway: int) -> None:
    """A worker's whole life (the target of its process): load, then answer calls until
    the socket closes, or until process `gateway` ends. Runs in the child only."""
    _exit_with(gateway)
    # Ctrl-C reaches the whole process group; the gateway shuts its workers down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with sock:
        message = _receive(sock)
        if message is None:
            return
        runner = _load(sock, message)
        if runner is None:
            return
        while (message := _receive(sock)) is not None:
            _send(sock, _answer(runner, message[1]))


def _exit_with(gateway: int) -> None:
    """End this process as soon as the gateway's ends, even in the middle of a call
    that never returns (an idle worker also sees its socket close). Its parent is the
    fork server, which lives until its last child does, so the parent's death cannot
    be the signal: a thread waits on a pidfd of the gateway instead (Linux 5.3+; polls
    once a second elsewhere)."""

    def watch() -> None:
        try:
            handle = os.pidfd_open(gateway)
        except ProcessLookupError:
            os._exit(1)
        except (OSError, AttributeError):
            while _alive(gateway):
                time.sleep(1.0)
            os._exit(1)
        select.select([handle], [], [])  # readable once the process has ended
        os._exit(1)

    threading.Thread(target=watch, name="rollguard gateway watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _load(sock: socket.socket, message: tuple[Any, ...]) -> Any:
    from rollguard.serving.runners import LocalRunner, create_runner

    _, manifest, directory, pinned = message
    assert isinstance(manifest, Manifest) and isinstance(pinned, PinnedBytes)
    try:
        runner = create_runner(manifest, directory, pinned)
        assert isinstance(runner, LocalRunner)
        asyncio.run(runner.load())
    except Exception as exc:  # its framework may raise anything; the reason goes back
        _send(sock, ("failed", str(exc) or type(exc).__name__))
        return None
    _send(sock, ("ready", os.getpid()))
    return runner


def _answer(runner: Any, inputs: Packed) -> tuple[Any, ...]:
    try:
        return ("ok", pack(runner.predict_sync(unpack(inputs))))
    except ServingError as exc:
        return ("error", type(exc).__name__, str(exc))
    except Exception as exc:  # the model's own failure, whatever its type
        return ("error", "ModelExecutionError", f"{type(exc).__name__}: {exc}")


def _send(sock: socket.socket, message: tuple[Any, ...]) -> None:
    try:
        data = encode(message)
    except Exception as exc:  # outputs that cannot be pickled (an unpicklable object)
        data = encode(("error", "ModelExecutionError", f"its outputs cannot be sent: {exc}"))
    sock.sendall(data)


def _receive(sock: socket.socket) -> tuple[Any, ...] | None:
    """The parent's next message, or None once it closed the socket."""
    header = _read_exactly(sock, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    body = _read_exactly(sock, length)
    if body is None:
        return None
    message = pickle.loads(body)  # from the gateway, which started this process
    assert isinstance(message, tuple)
    return message


def _read_exactly(sock: socket.socket, length: int) -> bytearray | None:
    buffer = bytearray(length)
    view = memoryview(buffer)
    done = 0
    while done < length:
        got = sock.recv_into(view[done:])
        if not got:
            return None
        done += got
    return buffer
