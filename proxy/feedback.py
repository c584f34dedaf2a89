"""Which recorded request a ground-truth label may reach: the feedback index.

A label names a request by its id, under the model in the feedback URL, from a caller.
The index keys every recorded request by (model, client, request id), so a label only
reaches a request of that model made by the same client (`client` is the authenticated
principal's name, "" for a request that brought no credential): an id from another
model, or another client's id, is simply unknown. Ids rollguard makes are unguessable
(proxy/inference.py `RequestIds`); ids clients give may repeat, and a repeated one never
takes over an entry that can still be labelled: the first request keeps it, and the
later one is served as usual but cannot be labelled (labels must not land on a request
their sender did not mean).

A preallocated ring remembers insertion order; when it wraps, the oldest entry is
dropped, so a label for it finds nothing.
"""

from __future__ import annotations

from rollguard.proxy.windows import VariantWindow

Key = tuple[str, str, str]  # (model, client or "", request id)


class FeedbackIndex:
    """(model, client, request id) → (window, seq) for the last `capacity` recorded requests."""

    __slots__ = ("_keys", "_pos", "_seqs", "_slot_of", "_windows", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity {capacity!r}: expected at least 1")
        self.capacity = capacity
        self._keys: list[Key | None] = [None] * capacity
        self._windows: list[VariantWindow | None] = [None] * capacity
        self._seqs: list[int] = [0] * capacity
        self._slot_of: dict[Key, int] = {}
        self._pos = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    def put(
        self, model: str, client: str | None, request_id: str, window: VariantWindow, seq: int
    ) -> bool:
        """Remember record `seq` of `window` under the key; False (nothing remembered) when
        the key already names a request that can still be labelled."""
        key = (model, client or "", request_id)
        slot_of = self._slot_of
        held = slot_of.get(key)
        if held is not None:
            earlier = self._windows[held]
            if earlier is not None and earlier.holds(self._seqs[held]):
                return False
            self._keys[held] = self._windows[held] = None  # its record is gone: free the key
            del slot_of[key]
        pos = self._pos
        self._pos = pos + 1 if pos + 1 < self.capacity else 0
        old = self._keys[pos]
        if old is not None:  # the oldest entry still indexed: evicted
            del slot_of[old]
        self._keys[pos] = key
        self._windows[pos] = window
        self._seqs[pos] = seq
        slot_of[key] = pos
        return True

    def pop(
        self, model: str, client: str | None, request_id: str
    ) -> tuple[VariantWindow, int] | None:
        """Take the key's (window, seq): None when unknown, evicted or already taken."""
        pos = self._slot_of.pop((model, client or "", request_id), None)
        if pos is None:
            return None
        window = self._windows[pos]
        self._windows[pos] = None
        self._keys[pos] = None
        assert window is not None  # every indexed slot holds a window
        return window, self._seqs[pos]
