"""How busy the gateway is, from CPU time: what decides whether shadow copies are shed."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


PROC_STAT = Path("/proc/stat")


def host_cpu_times(path: Path = PROC_STAT) -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole host from /proc/stat; None where it is absent."""
    try:
        with path.open("rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 5 or fields[0] != b"cpu":
        return None
    ticks = [float(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0.0)
    return sum(ticks) - idle, sum(ticks)


def host_busy_share(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Share of the host's CPU time that was busy between two `host_cpu_times` readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


class LoadGauge:
    """Whether the gateway is busy, from CPU time sampled every `period_s` on the loop.

    Busy means the event loop thread used at least `loop_busy` of one core over the last
    period (inline models, codecs, HTTP), or the whole process at least `cpu_busy` of
    every usable core (models on executor threads), or the host at least `host_busy` of
    all its CPUs (a sidecar shares its machine with the model servers it fronts, and a
    shadow copy sent to one of them takes CPU from the primary's). Sampling costs a few
    clock reads and one read of /proc/stat per period; the hot path only reads `busy`.
    """

    def __init__(
        self,
        *,
        period_s: float = 0.1,
        loop_busy: float = 0.6,
        cpu_busy: float = 0.8,
        host_busy: float = 0.9,
        cores: int | None = None,
        proc_stat: Path = PROC_STAT,
    ) -> None:
        self.period_s = period_s
        self.loop_busy = loop_busy
        self.cpu_busy = cpu_busy
        self.host_busy = host_busy
        self.host_share = 0.0  # of the whole host's CPU, last period
        self._proc_stat = proc_stat
        self._host: tuple[float, float] | None = None
        self.cores = cores or usable_cores()
        self.busy = False
        self.loop_share = 0.0  # of one core, last period
        self.cpu_share = 0.0  # of all usable cores, last period
        self._handle: asyncio.TimerHandle | None = None
        self._last = (0.0, 0.0, 0.0)

    def start(self) -> None:
        """Begin sampling; call on the event loop thread (thread_time is per thread)."""
        self._last = (time.monotonic(), time.thread_time(), time.process_time())
        self._host = host_cpu_times(self._proc_stat)
        self._handle = asyncio.get_running_loop().call_later(self.period_s, self._sample)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.busy = False

    def _sample(self) -> None:
        now = (time.monotonic(), time.thread_time(), time.process_time())
        wall = now[0] - self._last[0]
        if wall > 0:
            self.loop_share = (now[1] - self._last[1]) / wall
            self.cpu_share = (now[2] - self._last[2]) / wall / self.cores
        host = host_cpu_times(self._proc_stat) if self._host is not None else None
        if host is not None and self._host is not None:
            self.host_share = host_busy_share(self._host, host)
        self._host = host
        self.busy = (
            self.loop_share >= self.loop_busy
            or self.cpu_share >= self.cpu_busy
            or self.host_share >= self.host_busy
        )
        self._last = now
        self._handle = asyncio.get_running_loop().call_later(self.period_s, self._sample)
