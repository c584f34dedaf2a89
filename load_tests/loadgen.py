"""HTTP load against a loopback V2 endpoint: open loop at a fixed arrival rate, or closed loop.

Open loop: request i is due at t0 + i/rate whatever happened to earlier ones, so a slow
server cannot slow the arrivals down and hide its own latency (coordinated omission).
Latency is kept both from the due time and from the actual send. Beyond `max_inflight`
outstanding requests an arrival is recorded as dropped by the client, never delayed.
Closed loop: N connections, each sending its next request when the last one answered.
Every run is bounded in requests and in time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import orjson

DROPPED = -1  # status of an arrival the client dropped (max in-flight reached); never sent
CLIENT_ERROR = 0  # status when no HTTP answer came: connection error, client timeout
MAX_REQUESTS = 1_000_000
VARIANT_HEADER = "x-rollguard-variant"
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class RatePhase:
    """`rate` requests per second for `duration_s` seconds."""

    rate: float
    duration_s: float


@dataclass(frozen=True, slots=True)
class Workload:
    """What to send: bodies cycled in order, with optional sticky keys and delayed labels."""

    url: str
    bodies: Sequence[bytes]
    labels: Sequence[float | int | str] | None = None  # the true label of bodies[i], for feedback
    users: int = 0  # a pool of sticky keys user-0 … user-(users-1); 0: no key header
    user_header: str = "x-user-id"
    user_cookie: str | None = None  # the key goes in this cookie instead of user_header
    feedback_url: str | None = None  # None: no feedback
    feedback_delay_s: float = 1.0
    feedback_fraction: float = 1.0
    timeout_s: float = 10.0
    seed: int = 0


@dataclass(slots=True)
class Record:
    """One request; times in seconds after the run's t0 (nan when it never happened)."""

    scheduled: float
    start: float = math.nan
    end: float = math.nan
    status: int = CLIENT_ERROR
    variant: str | None = None
    retry_after: bool = False

    @property
    def latency_from_schedule(self) -> float:
        return self.end - self.scheduled

    @property
    def latency_from_send(self) -> float:
        return self.end - self.start


@dataclass(slots=True)
class LoadResult:
    mode: str
    started: float  # the clock at t0
    started_wall: float  # time.time() at t0, to place wall-clock audit entries
    records: list[Record] = field(default_factory=list)
    feedback_sent: int = 0
    feedback_ok: int = 0
    peak_inflight: int = 0


def schedule(phases: Sequence[RatePhase]) -> Iterator[float]:
    """Due times (seconds after t0) of every request: evenly spaced within each phase."""
    begin = 0.0
    for phase in phases:
        for k in range(round(phase.rate * phase.duration_s)):
            yield begin + k / phase.rate
        begin += phase.duration_s


def planned(phases: Sequence[RatePhase]) -> int:
    return sum(round(p.rate * p.duration_s) for p in phases)


def v2_bodies(rows: np.ndarray, input_name: str = "input") -> list[bytes]:
    """One V2 infer body (a single FP32 row) per row of `rows`."""
    width = int(np.prod(rows.shape[1:]))
    return [
        orjson.dumps(
            {
                "inputs": [
                    {
                        "name": input_name,
                        "datatype": "FP32",
                        "shape": [1, width],
                        "data": row.reshape(-1).tolist(),
                    }
                ]
            }
        )
        for row in rows.astype(np.float32)
    ]


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"load is only sent to loopback addresses, not {url!r}")


class _Sender:
    """Sends requests of one run, records them, and posts their delayed feedback."""

    def __init__(
        self,
        workload: Workload,
        session: aiohttp.ClientSession,
        labels: aiohttp.ClientSession,
        clock: Clock,
    ) -> None:
        self.w = workload
        self.session = session
        self.labels = labels  # its own pool: feedback must not queue requests behind it
        self.clock = clock
        self.rng = np.random.default_rng(workload.seed)
        self.result = LoadResult("", clock(), time.time())
        self.inflight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.feedback: set[asyncio.Task[None]] = set()
        self.count = 0

    def now(self) -> float:
        return self.clock() - self.result.started

    def prepare(self, due: float) -> tuple[Record, int, str | None]:
        """Record an arrival and pick its body and sticky key, in arrival order."""
        record = Record(due)
        self.result.records.append(record)
        i, self.count = self.count, self.count + 1
        user = f"user-{int(self.rng.integers(self.w.users))}" if self.w.users else None
        return record, i, user

    def drop(self, due: float) -> None:
        self.prepare(due)[0].status = DROPPED

    def launch(self, due: float) -> None:
        task = asyncio.get_running_loop().create_task(self.send(*self.prepare(due)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def send(self, record: Record, i: int, user: str | None) -> None:
        w = self.w
        headers = {"Content-Type": "application/json"}
        if user is not None:
            if w.user_cookie is not None:
                headers["Cookie"] = f"{w.user_cookie}={user}"
            else:
                headers[w.user_header] = user
        self.inflight += 1
        self.result.peak_inflight = max(self.result.peak_inflight, self.inflight)
        request_id = None
        record.start = self.now()
        if math.isnan(record.scheduled):  # closed loop: due when sent
            record.scheduled = record.start
        try:
            body = w.bodies[i % len(w.bodies)]
            async with self.session.post(w.url, data=body, headers=headers) as r:
                await r.read()
                record.status = r.status
                record.variant = r.headers.get(VARIANT_HEADER)
                record.retry_after = "Retry-After" in r.headers
                request_id = r.headers.get("x-request-id")
        except (aiohttp.ClientError, TimeoutError):
            record.status = CLIENT_ERROR
        finally:
            record.end = self.now()
            self.inflight -= 1
        if record.status == 200 and request_id is not None:
            self.maybe_label(request_id, i)

    def maybe_label(self, request_id: str, i: int) -> None:
        """Schedule the true label of body i for a share `feedback_fraction` of answers."""
        labels, w = self.w.labels, self.w
        if w.feedback_url is None or labels is None or self.rng.random() >= w.feedback_fraction:
            return
        task = asyncio.get_running_loop().create_task(
            self.label(request_id, labels[i % len(labels)])
        )
        self.feedback.add(task)
        task.add_done_callback(self.feedback.discard)

    async def label(self, request_id: str, label: float | int | str) -> None:
        """Post the true label after the delay, as delayed ground truth arrives."""
        await asyncio.sleep(self.w.feedback_delay_s)
        body = orjson.dumps({"id": request_id, "label": label})
        self.result.feedback_sent += 1
        try:
            async with self.labels.post(
                str(self.w.feedback_url), data=body, headers={"Content-Type": "application/json"}
            ) as r:
                await r.read()
                self.result.feedback_ok += r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            pass

    async def drain(self, deadline_s: float) -> None:
        """Wait for requests and due feedback until the deadline, then cancel the rest."""
        for pending in (self.tasks, self.feedback):
            if pending:
                await asyncio.wait(list(pending), timeout=max(0.0, deadline_s - self.now()))
            for task in list(pending):
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


def _session(w: Workload, connections: int) -> aiohttp.ClientSession:
    # As many pooled connections as requests may be in flight: a request waiting for a
    # pooled connection would count client queueing as server latency.
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=w.timeout_s)
    )


async def run_open(
    workload: Workload,
    phases: Sequence[RatePhase],
    *,
    max_inflight: int = 256,
    stop: Callable[[], bool] | None = None,
    clock: Clock = time.monotonic,
) -> LoadResult:
    """Send at the phases' arrival rates; `stop()` true ends the schedule early."""
    _check_loopback(workload.url)
    total = planned(phases)
    if not 0 < total <= MAX_REQUESTS or max_inflight < 1:
        raise ValueError(
            f"{total} planned requests (max {MAX_REQUESTS}), max_inflight {max_inflight}"
        )
    async with _session(workload, max_inflight) as session, _session(workload, 32) as labels:
        sender = _Sender(workload, session, labels, clock)
        sender.result.mode = "open"
        for due in schedule(phases):
            if stop is not None and stop():
                break
            # A timer may fire a little early: never send before the due time.
            while (delay := due - sender.now()) > 0:  # noqa: ASYNC110 - a time, not an event
                await asyncio.sleep(delay)
            # Launched tasks not yet sending count too: they are in flight for the bound.
            if len(sender.tasks) >= max_inflight:
                sender.drop(due)
            else:
                sender.launch(due)
        await sender.drain(sender.now() + workload.timeout_s + workload.feedback_delay_s)
    return sender.result


async def run_closed(
    workload: Workload,
    *,
    connections: int,
    duration_s: float,
    max_requests: int = MAX_REQUESTS,
    stop: Callable[[], bool] | None = None,
    clock: Clock = time.monotonic,
) -> LoadResult:
    """`connections` workers, each sending its next request as soon as the last answered."""
    _check_loopback(workload.url)
    if connections < 1 or duration_s <= 0 or not 0 < max_requests <= MAX_REQUESTS:
        raise ValueError(f"connections {connections}, duration {duration_s}s, {max_requests} max")
    async with _session(workload, connections) as session, _session(workload, 32) as labels:
        sender = _Sender(workload, session, labels, clock)
        sender.result.mode = "closed"

        async def worker() -> None:
            while sender.now() < duration_s and sender.count < max_requests:
                if stop is not None and stop():
                    return
                await sender.send(*sender.prepare(math.nan))

        await asyncio.gather(*(worker() for _ in range(connections)))
        await sender.drain(sender.now() + workload.feedback_delay_s + workload.timeout_s)
    return sender.result
