"""Webhook notifications of rollout decisions: JSON POSTs with retries, never awaited inline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import orjson

from rollguard.policy.schema import Webhook

log = logging.getLogger("rollguard.notify")


class Notifier:
    """Sends each decision to a rollout's webhooks in background tasks.

    `send` returns at once: delivery (with exponential back-off between retries and a
    per-attempt timeout) happens in tracked tasks so the decision loop never waits.
    """

    def __init__(self, session: aiohttp.ClientSession, *, max_pending: int = 1000) -> None:
        self._session = session
        self._tasks: set[asyncio.Task[None]] = set()
        self._max_pending = max_pending
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    def send(self, hooks: Sequence[Webhook], payload: Mapping[str, Any]) -> None:
        body = orjson.dumps(dict(payload), option=orjson.OPT_SERIALIZE_NUMPY, default=str)
        for hook in hooks:
            if len(self._tasks) >= self._max_pending:
                self.dropped += 1
                log.warning(
                    "webhook %s dropped: %d deliveries pending", hook.webhook, len(self._tasks)
                )
                continue
            task = asyncio.get_running_loop().create_task(self._deliver(hook, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, hook: Webhook, body: bytes) -> None:
        delay = 0.2
        for attempt in range(hook.retries + 1):
            try:
                async with self._session.post(
                    hook.webhook,
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=hook.timeout),
                ) as resp:
                    if resp.status < 300:
                        self.delivered += 1
                        return
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < hook.retries:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.failed += 1
        log.warning(
            "webhook %s failed after %d attempts: %s", hook.webhook, hook.retries + 1, problem
        )

    async def close(self, wait_s: float = 2.0) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=wait_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
