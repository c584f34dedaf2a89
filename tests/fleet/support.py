"""Waiting on Redis-side conditions with a deadline; background work bound to a block."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Wait until `await condition()` holds, re-checking every 20 ms; TimeoutError after
    `timeout_s` (Redis has no event for "this key expired" that a test could await)."""
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110 - polling Redis is the only way
            await asyncio.sleep(0.02)


@asynccontextmanager
async def running(work: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """Run `work` as a task for the block; cancelled and awaited when it ends."""
    task = asyncio.create_task(work)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
