"""Waiting on Redis-side conditions with a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Wait until `await condition()` holds, re-checking every 20 ms; TimeoutError after
    `timeout_s` (Redis has no event for "this key expired" that a test could await)."""
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110 - polling Redis is the only way
            await asyncio.sleep(0.02)
