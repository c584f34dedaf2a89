"""What the data port holds for its clients, bounded: connections and buffered request bodies.

`Capacity` is plain bookkeeping, called by proxy/protocol.py on the event loop:

- connections, in total and per client address, are counted at accept; one past either
  cap is refused before a byte of it is read;
- a request body is admitted at the end of its head, before any of it is buffered: it
  takes one of `max_inflight` slots (shared with the requests being answered) while it
  arrives, and reserves its bytes out of `max_buffered_bytes` as they come, held until
  its answer is written.

Refusals and time-outs are counted here as plain numbers; proxy/metrics.py reads them at
scrape time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum


class Refusal(Enum):
    """Why a connection or a body was not taken."""

    MAX_CONNECTIONS = "max_connections"
    MAX_CONNECTIONS_PER_CLIENT = "max_connections_per_client"
    OVERLOADED = "overloaded"  # max_inflight requests in flight or arriving
    BUFFER_FULL = "buffer_full"  # max_buffered_bytes of bodies held


TIMEOUT_PHASES = ("head", "body", "idle")


@dataclass(eq=False)
class Capacity:
    """Connection and body-buffer accounting of one data port."""

    max_connections: int
    max_connections_per_client: int  # 0: no per-client cap
    max_buffered_bytes: int
    max_inflight: int
    inflight: Callable[[], int] = lambda: 0  # requests being answered (the data plane's)
    connections: int = 0
    receiving: int = 0  # bodies admitted and still arriving
    buffered: int = 0  # bytes reserved by bodies arriving, queued or being answered
    high_water: int = 0  # the most `buffered` has been since the owner last reset it
    refused: dict[Refusal, int] = field(default_factory=lambda: dict.fromkeys(Refusal, 0))
    timed_out: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIMEOUT_PHASES, 0))
    _clients: dict[str, int] = field(default_factory=dict)

    def connect(self, client: str) -> Refusal | None:
        """Count a new connection from `client`, or say why it is refused (not counted)."""
        if self.connections >= self.max_connections:
            return self._refuse(Refusal.MAX_CONNECTIONS)
        held = self._clients.get(client, 0)
        if self.max_connections_per_client and held >= self.max_connections_per_client:
            return self._refuse(Refusal.MAX_CONNECTIONS_PER_CLIENT)
        self.connections += 1
        self._clients[client] = held + 1
        return None

    def disconnect(self, client: str) -> None:
        """A connection `connect` counted has closed."""
        self.connections -= 1
        held = self._clients[client] - 1
        if held:
            self._clients[client] = held
        else:
            del self._clients[client]

    def client_connections(self, client: str) -> int:
        return self._clients.get(client, 0)

    def admit_body(self, length: int) -> Refusal | None:
        """A body of `length` bytes (0: chunked, size unknown yet) may start arriving:
        it takes a slot and reserves `length`; else why not (nothing taken)."""
        if self.inflight() + self.receiving >= self.max_inflight:
            return self._refuse(Refusal.OVERLOADED)
        if self.buffered + length > self.max_buffered_bytes:
            return self._refuse(Refusal.BUFFER_FULL)
        self.receiving += 1
        self.buffered += length
        self.high_water = max(self.high_water, self.buffered)
        return None

    def grow(self, extra: int) -> Refusal | None:
        """Reserve `extra` more bytes for an admitted body (chunked, or inflated)."""
        if self.buffered + extra > self.max_buffered_bytes:
            return self._refuse(Refusal.BUFFER_FULL)
        self.buffered += extra
        self.high_water = max(self.high_water, self.buffered)
        return None

    def received(self) -> None:
        """An admitted body has arrived (or was given up): its slot is free, its bytes
        stay reserved until `release`."""
        self.receiving -= 1

    def release(self, reserved: int) -> None:
        self.buffered -= reserved

    def _refuse(self, why: Refusal) -> Refusal:
        self.refused[why] += 1
        return why
