"""Which recorded request a ground-truth label may reach: the feedback index.

Every answered routed request is remembered here, under (model, client, request id), with
what a label needs: the version's window, the window's generation when the request was
recorded, and the prediction of every row of the answer. A label is scored against
those predictions whenever it arrives, however far the version's ring buffer has moved
on: at a 5 % split the stable's 2,000-slot window spans seconds, and labels that come
minutes later must still count for both arms alike.

Scope: a label only reaches a request of the model in the feedback URL made by the same
client (`client` is the authenticated principal's name, "" for a request that brought
no credential): an id from another model, or another client's id, is simply unknown.
Ids rollguard makes are unguessable (proxy/inference.py `RequestIds`); ids clients give
may repeat, and a repeated one never takes over an entry that can still be labelled:
the first request keeps it, the later one is served as usual but cannot be labelled
(labels must not land on a request their sender did not mean). Once labelled (or
forgotten) an id is free again.

Bounds, both settings (proxy/settings.py): the index holds the requests of the last
`capacity` rows answered (`feedback_capacity`; labelled or not, so memory never depends
on the label rate; a request of more rows than that is not remembered at all) and none
older than `max_age_s` (`feedback_max_age_s`); the oldest go first. A request forgotten
unlabelled leaves a tombstone (its key's hash, no data), so its late label is told
"expired" rather than "unknown" while the gateway still remembers having forgotten it:
tombstones come in two generations of at most `capacity` each, the older dropped whole
when the newer fills, so the last `capacity` forgotten ids are always remembered, and at
most 2 × `capacity`. A label for an id put again meanwhile reaches the new request.

The hot path is `put`, once per answered request: the key and what is kept of the
request are two tuples, and a dict entry and a deque entry share the second. About 310
bytes a request besides its id (390 with a 32-character id), tombstones aside; 390 (470)
when the deque held (key, kept) pairs and the window was named by its `id()`, a new int
each put.

What is kept per request holds only strings and numbers: the window is named by a small
number the index gives it, not referenced. The collector untracks such tuples the first
time it looks at them, so the 100,000 requests of a full index cost it nothing. With the
window in the tuple, each request kept two tracked tuples: a full collection walked all
200,000 (~10 ms with the event loop stopped, a few times a minute at 5,000 requests a
second), which showed as the gateway's p99.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import Enum

from rollguard.proxy.windows import VariantWindow
from rollguard.serving.prediction import Predicted

Key = tuple[str, str, str]  # (model, client or "", request id)
Rows = tuple[Predicted, ...]  # a request's prediction per row
# What the index keeps of one request: (its key, its window's number in `_windows`, the
# window's generation then, rows, put at, candidate weight): no reference the collector
# tracks.
_Kept = tuple[Key, int, int, Rows, float, float]


class Missing(Enum):
    """Why a key names no request that can take a label."""

    UNKNOWN = "unknown"  # never indexed here, another scope's, or already labelled
    EXPIRED = "expired"  # indexed, then forgotten unlabelled by the rows or age bound


class FeedbackIndex:
    """(model, client, request id) → the request's window and row predictions, bounded
    in rows and age."""

    __slots__ = (
        "_clock",
        "_dropped",
        "_live",
        "_numbers",
        "_older",
        "_order",
        "_rows",
        "_tombs",
        "_windows",
        "capacity",
        "max_age_s",
    )

    def __init__(
        self, capacity: int, max_age_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity {capacity!r}: expected at least 1")
        if not max_age_s > 0:
            raise ValueError(f"max_age_s {max_age_s!r}: expected a positive number of seconds")
        self.capacity = capacity
        self.max_age_s = max_age_s
        self._clock = clock
        self._live: dict[Key, _Kept] = {}  # the requests that can still take a label
        self._order: deque[_Kept] = deque()  # every request held, oldest first
        self._rows = 0  # rows of the requests in the order, labelled or not
        self._tombs: dict[int, None] = {}  # key hashes of the newer tombstones
        self._older: dict[int, None] = {}  # and of the generation before
        # The windows kept requests name, by number, and back: held here so that a number
        # names one window while any request names it; pruned every `capacity` requests
        # dropped. A put finds its window's number object here and makes no int.
        self._windows: dict[int, VariantWindow] = {}
        self._numbers: dict[VariantWindow, int] = {}
        self._dropped = 0

    def __len__(self) -> int:
        """Requests that can take a label now."""
        return len(self._live)

    @property
    def held(self) -> int:
        """Requests held in memory, labelled or not (their rows ≤ capacity)."""
        return len(self._order)

    @property
    def rows(self) -> int:
        """Rows of the requests held (at most `capacity`)."""
        return self._rows

    @property
    def tombstones(self) -> int:
        """Tombstones held (at most 2 × `capacity`)."""
        return len(self._tombs) + len(self._older)

    def put(
        self,
        model: str,
        client: str | None,
        request_id: str,
        window: VariantWindow,
        predictions: Rows,
        share: float = 0.0,
    ) -> bool:
        """Remember a request's row predictions under the key; False (nothing remembered)
        when the key already names a request that can still be labelled, or the request
        has more rows than the index may hold. `share`: the candidate's configured percent
        the request was routed at (its window's stratum), handed back by `take`."""
        now = self._clock()
        order = self._order
        if order and order[0][4] <= now - self.max_age_s:
            self._forget_old(now)
        key = (model, client or "", request_id)
        live = self._live
        rows = len(predictions)
        if key in live or not 0 < rows <= self.capacity:
            return False
        number = self._numbers.get(window)
        if number is None:
            number = self._number(window)
        kept = (key, number, window.generation, predictions, now, share)
        live[key] = kept
        order.append(kept)
        self._rows += rows
        if self._rows > self.capacity:
            self._forget_old(now)
        return True

    def find(self, model: str, client: str | None, request_id: str) -> Rows | Missing:
        """The row predictions of the key's request, left in place (see `take`)."""
        self._forget_old(self._clock())
        key = (model, client or "", request_id)
        kept = self._live.get(key)
        if kept is None:
            buried = hash(key)
            gone = buried in self._tombs or buried in self._older
            return Missing.EXPIRED if gone else Missing.UNKNOWN
        return kept[3]

    def take(
        self, model: str, client: str | None, request_id: str
    ) -> tuple[VariantWindow, int, Rows, float] | Missing:
        """Take the key's (window, generation, row predictions, candidate weight it was
        routed at) once: a second take of the same request finds it UNKNOWN (one label per
        request)."""
        found = self.find(model, client, request_id)
        if isinstance(found, Missing):
            return found
        key = (model, client or "", request_id)
        _, number, generation, predictions, _, share = self._live.pop(key)
        buried = hash(key)  # an id put again after it was forgotten: no longer
        self._tombs.pop(buried, None)
        self._older.pop(buried, None)
        return self._windows[number], generation, predictions, share

    def _forget_old(self, now: float) -> None:
        """Drop the oldest requests while over the rows bound or past the age bound; one
        that could still take a label leaves a tombstone."""
        order, live = self._order, self._live
        oldest_kept = now - self.max_age_s
        while order and (self._rows > self.capacity or order[0][4] <= oldest_kept):
            kept = order.popleft()
            key = kept[0]
            self._rows -= len(kept[3])
            self._dropped += 1
            if live.get(key) is kept:  # not labelled (nor put again after a label)
                del live[key]
                tombs = self._tombs
                tombs[hash(key)] = None
                if len(tombs) >= self.capacity:  # a new generation; the oldest is dropped
                    self._older, self._tombs = tombs, {}
        if self._dropped >= self.capacity:  # let go of windows no request names any more
            self._dropped = 0
            named = {kept[1] for kept in order}
            self._windows = {n: w for n, w in self._windows.items() if n in named}
            self._numbers = {w: n for n, w in self._windows.items()}

    def _number(self, window: VariantWindow) -> int:
        """A number for a window no kept request names yet: the smallest free one."""
        number = next(n for n in range(len(self._windows) + 1) if n not in self._windows)
        self._windows[number] = window
        self._numbers[window] = number
        return number
