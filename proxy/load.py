"""How busy the gateway itself is, from its own CPU time: what decides whether shadow copies
are shed.

Pressure is measured where the gateway can feel it, never host-wide: a sidecar shares its
node with work that is none of its business, and a busy neighbour must not stop a shadow
rollout from mirroring. Three signals, sampled every `period_s` on the event loop:

- `event_loop`: the loop thread's CPU time, as a share of one core. The loop reads,
  routes, encodes and runs inline models for every request; near a whole core, requests
  queue behind each other and a copy would make them wait longer.
- `process`: the whole process's CPU time (model threads included), as a share of the
  cores it may run on (`sched_getaffinity`).
- `cgroup`: the CPU quota of the gateway's own cgroup (cgroup v2 `cpu.max` and
  `cpu.stat`; v1's `cpu.cfs_quota_us` and `cpuacct.usage` where only v1 is mounted):
  usage as a share of the quota, or any throttled period. Without a quota there is no
  such limit to run into, and the signal stays 0 (the root cgroup, where a plain VM's
  processes live, is the whole host: not the gateway's own).

Each signal is a moving average over about three periods. The gateway is under pressure
while any is at or above `threshold` (0.9). The hot
path reads `busy` only; sampling costs a few clock reads and, with a quota, two small
file reads per period.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SIGNALS = ("event_loop", "process", "cgroup")
_SMOOTHING = 0.3  # weight of the newest period in each signal's moving average
CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class CpuQuota:
    """Where one cgroup's CPU usage, quota and throttling are read."""

    usage: Path  # v2 cpu.stat (usage_usec) or v1 cpuacct.usage (ns)
    throttling: Path | None  # v2 cpu.stat (nr_throttled) or v1 cpu.stat
    limit: Path  # v2 cpu.max or v1 cpu.cfs_quota_us
    period: Path | None  # v1 cpu.cfs_period_us (v2 keeps it in cpu.max)
    v2: bool

    def cores(self) -> float | None:
        """The quota in cores, or None when there is none ("max", -1, unreadable)."""
        try:
            text = self.limit.read_text().split()
            if self.v2:
                if not text or text[0] == "max":
                    return None
                quota, period = float(text[0]), float(text[1]) if len(text) > 1 else 100_000.0
            else:
                quota = float(text[0])
                period = float(self.period.read_text()) if self.period is not None else 100_000.0
        except (OSError, ValueError, IndexError):
            return None
        return quota / period if quota > 0 and period > 0 else None

    def read(self) -> tuple[float, int] | None:
        """(CPU seconds used, throttled periods) so far; None when unreadable."""
        try:
            if self.v2:
                stat = _fields(self.usage.read_text())
                return stat["usage_usec"] / 1e6, int(stat.get("nr_throttled", 0))
            used = int(self.usage.read_text()) / 1e9
            throttled = 0
            if self.throttling is not None:
                throttled = int(_fields(self.throttling.read_text()).get("nr_throttled", 0))
            return used, throttled
        except (OSError, ValueError, KeyError):
            return None


def _fields(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value:
            found[key] = float(value)
    return found


def own_cgroup(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT
) -> CpuQuota | None:
    """This process's cgroup with a CPU controller, v2 first, then v1; None in the root
    cgroup (the whole host) or where neither is mounted."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    v1: str | None = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and path not in ("", "/"):
            directory = root / path.lstrip("/")
            if (directory / "cpu.max").exists():
                stat = directory / "cpu.stat"
                return CpuQuota(stat, stat, directory / "cpu.max", None, v2=True)
        if "cpu" in controllers.split(",") and path not in ("", "/"):
            v1 = path
    if v1 is None:
        return None
    for cpu_dir, acct_dir in (("cpu,cpuacct", "cpu,cpuacct"), ("cpu", "cpuacct")):
        cpu = root / cpu_dir / v1.lstrip("/")
        acct = root / acct_dir / v1.lstrip("/")
        if (cpu / "cpu.cfs_quota_us").exists() and (acct / "cpuacct.usage").exists():
            return CpuQuota(
                acct / "cpuacct.usage",
                cpu / "cpu.stat",
                cpu / "cpu.cfs_quota_us",
                cpu / "cpu.cfs_period_us",
                v2=False,
            )
    return None


class LoadGauge:
    """Whether the gateway is under CPU pressure, sampled every `period_s` on the loop."""

    def __init__(
        self,
        *,
        period_s: float = 0.1,
        threshold: float = 0.9,
        cores: int | None = None,
        cgroup: CpuQuota | Literal["own"] | None = "own",
    ) -> None:
        """`cgroup`: where to read the quota ("own": this process's own cgroup; None: no
        cgroup signal)."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"pressure threshold must be within (0, 1], got {threshold}")
        self.period_s = period_s
        self.threshold = threshold
        self.cores = cores or usable_cores()
        self.cgroup: CpuQuota | None = own_cgroup() if isinstance(cgroup, str) else cgroup
        self.busy = False
        self.shares = dict.fromkeys(SIGNALS, 0.0)  # last period's, each of its own limit
        self.busy_periods = 0  # periods sampled under pressure, since start
        self.periods = 0
        self._handle: asyncio.TimerHandle | None = None
        self._last = (0.0, 0.0, 0.0)
        self._last_cgroup: tuple[float, int] | None = None

    def start(self) -> None:
        """Begin sampling; call on the event loop thread (thread_time is per thread)."""
        self._last = (time.monotonic(), time.thread_time(), time.process_time())
        self._last_cgroup = self.cgroup.read() if self.cgroup is not None else None
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
            shares = self.shares
            cgroup = self._cgroup_share(wall)
            for signal, raw in (
                ("event_loop", (now[1] - self._last[1]) / wall),
                ("process", (now[2] - self._last[2]) / wall / self.cores),
                ("cgroup", cgroup),
            ):
                # Smoothed over about three periods: a 100 ms burst (a collector pause, a
                # neighbour's spike) is not sustained pressure; throttling counts at once.
                shares[signal] += _SMOOTHING * (raw - shares[signal])
            if cgroup >= 1.0:
                shares["cgroup"] = cgroup
        self._last = now
        self.busy = max(self.shares.values()) >= self.threshold
        self.periods += 1
        self.busy_periods += self.busy
        self._handle = asyncio.get_running_loop().call_later(self.period_s, self._sample)

    def _cgroup_share(self, wall: float) -> float:
        """Usage over the last period as a share of the quota; 1.0 when throttled."""
        if self.cgroup is None:
            return 0.0
        reading, last = self.cgroup.read(), self._last_cgroup
        self._last_cgroup = reading
        quota = self.cgroup.cores()
        if reading is None or last is None or quota is None:
            return 0.0
        if reading[1] > last[1]:
            return 1.0  # the quota ran out within a period: the kernel stopped us
        return (reading[0] - last[0]) / wall / quota
