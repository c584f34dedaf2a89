"""Serving the gateway on a TCP port: the fast infer path in front of aiohttp, start and stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from aiohttp import web

from rollguard.proxy.fastpath import KEEPALIVE_TIMEOUT_S, FastPath
from rollguard.proxy.guard import LIMITS
from rollguard.proxy.state import GATEWAY, SETTINGS

SHUTDOWN_TIMEOUT_S = 5.0  # requests in flight get this long to finish at shutdown


class Served:
    """A listening gateway: its port, and a graceful `close()`."""

    def __init__(
        self,
        runner: web.AppRunner,
        server: asyncio.Server,
        fast: FastPath | None,
        grace_s: float,
    ) -> None:
        self._runner = runner
        self._server = server
        self._fast = fast
        self._grace_s = grace_s
        self.port: int = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop accepting, close idle connections, let requests in flight finish (within
        the grace period), then stop aiohttp's connections and the app's services."""
        self._server.close()
        if self._fast is not None:
            connections = list(self._fast.connections)
            for conn in connections:
                conn.shutdown()
            workers = [c.worker for c in connections if c.worker is not None]
            if workers:
                _, pending = await asyncio.wait(workers, timeout=self._grace_s)
                for task in pending:
                    task.cancel()
            for conn in list(self._fast.connections):
                conn.abort()
        await self._runner.cleanup()
        with contextlib.suppress(TimeoutError):  # let closed connections say so
            await asyncio.wait_for(self._server.wait_closed(), 1.0)


async def start_server(
    app: web.Application,
    host: str,
    port: int,
    *,
    keepalive_s: float = KEEPALIVE_TIMEOUT_S,
    grace_s: float = SHUTDOWN_TIMEOUT_S,
) -> Served:
    """Start the app's services, then listen; with `fast_path` off, aiohttp takes every
    connection from its first byte."""
    runner = web.AppRunner(
        app, access_log=None, keepalive_timeout=keepalive_s, shutdown_timeout=grace_s
    )
    await runner.setup()
    aiohttp_server = runner.server
    assert aiohttp_server is not None
    fast: FastPath | None = None
    factory: Callable[[], asyncio.Protocol] = aiohttp_server
    if app[SETTINGS].fast_path:
        fast = FastPath(app[GATEWAY], app[LIMITS], aiohttp_server, keepalive_s)
        factory = fast
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(factory, host, port, reuse_address=True)
    except BaseException:
        await runner.cleanup()
        raise
    return Served(runner, server, fast, grace_s)
