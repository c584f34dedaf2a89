"""Failed admin credentials per client: after `limit` failures in `window_s`, wait.

A sliding window of failure times per client address. While a client is locked out,
its requests are refused before any token is compared, so guessing costs the guesser
time rather than the gateway CPU. The table is bounded: beyond `max_clients`, the
client whose last failure is oldest is forgotten first.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable


class Lockout:
    """Counts failed credentials by client and says how long a locked-out client waits."""

    def __init__(
        self,
        *,
        limit: int = 10,
        window_s: float = 60.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or window_s <= 0 or max_clients < 1:
            raise ValueError("limit and max_clients must be >= 1, window_s > 0")
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> int | None:
        """Whole seconds until `client` may try again, or None when it may try now."""
        times = self._failures.get(client)
        if times is None:
            return None
        now = self._clock()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        if len(times) < self.limit:
            return None
        # The oldest failure leaves the window first; then one more try is allowed.
        return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, client: str) -> None:
        """Record one failed attempt by `client`."""
        times = self._failures.pop(client, None)
        if times is None:
            times = deque(maxlen=self.limit)
            while len(self._failures) >= self.max_clients:
                self._failures.popitem(last=False)
        times.append(self._clock())
        self._failures[client] = times  # most recently failing last

    def __len__(self) -> int:
        return len(self._failures)
