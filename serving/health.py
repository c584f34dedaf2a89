"""Whether an http upstream is fit to take traffic, followed after load.

Two signals, as Kubernetes readiness probes and Envoy's outlier detection give them:
- active: the runner probes `<endpoint>/ready` every `probe_interval_s`;
  `unready_after` failed probes in a row make the version unready, one good probe
  makes it ready again;
- passive: `eject_after` failed calls in a row (5xx, reset, timeout; never the client's
  own 4xx) eject the version for `eject_base_s`, doubled for each ejection in a row up
  to `eject_max_s`; a good answer after that clears the count.
An unready or ejected version reads as not ready: the registry's availability is then
UNREADY, so routing fails a candidate's share over to the stable, and its
`/v2/models/{m}/versions/{v}/ready` answers 503.

Pure state with an injected clock; the runner does the I/O and the logging.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import Enum


class Health(Enum):
    READY = "ready"
    UNREADY = "unready"  # its ready probe fails
    EJECTED = "ejected"  # its calls fail (outlier detection), until the back-off ends


class UpstreamHealth:
    """One upstream's probe and call outcomes, and what they add up to."""

    def __init__(
        self,
        *,
        unready_after: int,
        eject_after: int,
        eject_base_s: float,
        eject_max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.unready_after = unready_after
        self.eject_after = eject_after
        self.eject_base_s = eject_base_s
        self.eject_max_s = eject_max_s
        self._clock = clock
        self.failed_probes = 0
        self.failed_calls = 0
        self.ejections = 0  # in a row; cleared by a good answer after the back-off
        self.ejected_until = 0.0
        self._before_ejection = (0, 0.0)  # (ejections, ejected_until) the last one replaced
        # Every recorded call outcome bumps `serial`. A failure names its serial when it is
        # excused (`excused`): only a failure of the current run of failures, or of the run
        # that ejected the upstream, is taken back, and each serial once.
        self.serial = 0
        self._run_start = 0  # serial of the first failure of the current run
        self._ejecting_run: tuple[int, int] | None = None  # (first, last) serial of the run
        # that ejected it, while that ejection stands
        self._excused: deque[int] = deque(maxlen=256)
        self.probe_ok = True

    @property
    def state(self) -> Health:
        if not self.probe_ok:
            return Health.UNREADY
        if self._clock() < self.ejected_until:
            return Health.EJECTED
        return Health.READY

    @property
    def ok(self) -> bool:
        return self.probe_ok and self._clock() >= self.ejected_until

    def probed(self, ok: bool) -> bool:
        """Record a probe; True when it changed whether the probes say ready."""
        if ok:
            self.failed_probes = 0
            changed = not self.probe_ok
            self.probe_ok = True
            return changed
        self.failed_probes += 1
        if self.probe_ok and self.failed_probes >= self.unready_after:
            self.probe_ok = False
            return True
        return False

    def answered(self) -> None:
        """A call succeeded (or was the client's fault: the upstream is fine)."""
        self.serial += 1
        self.failed_calls = 0
        if self.ejections and self._clock() >= self.ejected_until:
            self.ejections = 0

    def failed(self) -> float | None:
        """A call failed; the ejection's length in seconds when this one ejects it."""
        self.serial += 1
        if self.failed_calls == 0:
            self._run_start = self.serial
        self.failed_calls += 1
        if self.failed_calls < self.eject_after:
            return None
        self.failed_calls = 0
        self._before_ejection = (self.ejections, self.ejected_until)
        self._ejecting_run = (self._run_start, self.serial)
        self.ejections += 1
        length = min(self.eject_base_s * 2.0 ** (self.ejections - 1), self.eject_max_s)
        self.ejected_until = self._clock() + length
        return length

    def excused(self, serial: int) -> None:
        """The failed call recorded as `serial` turned out not to be the upstream's (every
        version failed its input): it no longer counts. When its run of failures ejected
        the upstream, the ejection is lifted (that run would have fallen one short).
        A failure from before the current run (a success or an ejection came since) is
        past forgiving: excusing it would lift what other failures earned. Each serial is
        excused once: a batched call that failed several callers is one failure."""
        if serial in self._excused:
            return
        self._excused.append(serial)
        run = self._ejecting_run
        if run is not None and run[0] <= serial <= run[1] and self._clock() < self.ejected_until:
            self.ejections, self.ejected_until = self._before_ejection
            self._ejecting_run = None
            self._run_start = run[0]
            self.failed_calls += self.eject_after - 1  # and any failures since
        elif serial >= self._run_start and self.failed_calls > 0:
            self.failed_calls -= 1
