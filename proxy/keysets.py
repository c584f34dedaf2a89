"""Which stickiness keys have been seen: a fixed-size bit set for first-sight counting.

A sticky (hash) split randomises keys, not requests, so the sample-ratio check counts
each key once (the first time it is routed since the split changed) and the conditional
tests count each key's first error and first slow request (policy/conditional.py): a
heavy user's hundredth error says nothing about which arm it was assigned to.

2**24 bits (2 MiB), indexed by the process's own string hash, which is independent of
the split's blake2b bucket: a new key whose bit another key already set is skipped, and
that thins both arms alike, so the counts stay valid (about 6 % of a million keys, 45 %
of ten million, are skipped).
"""

from __future__ import annotations

__all__ = ["KEY_BITS", "KeySet"]

KEY_BITS = 2**24


class KeySet:
    """Keys seen since the last clear(); the bits are allocated on first use."""

    __slots__ = ("_bits",)

    def __init__(self) -> None:
        self._bits: bytearray | None = None  # indexing a bytearray beats numpy's scalars

    def add(self, key: str) -> bool:
        """Mark `key` seen; True when it was not seen before."""
        bits = self._bits
        if bits is None:
            bits = self._bits = bytearray(KEY_BITS // 8)
        h = hash(key) & (KEY_BITS - 1)
        byte, bit = h >> 3, 1 << (h & 7)
        if bits[byte] & bit:
            return False
        bits[byte] |= bit
        return True

    def clear(self) -> None:
        self._bits = None
