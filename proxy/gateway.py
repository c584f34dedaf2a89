"""One rollguard process: its services, the data port and the admin port, started and stopped.

The data port is served end to end by rollguard's own HTTP/1.1 protocol
(proxy/protocol.py) in front of `DataPlane`; the admin port by an aiohttp application
(proxy/admin.py). Every setting comes from `Settings` and is handed to the constructors.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import CollectorRegistry

from rollguard.proxy.admin import Admin
from rollguard.proxy.endpoints import DataPlane
from rollguard.proxy.inference import Inference, RequestIds
from rollguard.proxy.load import LoadGauge
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.protocol import Server
from rollguard.proxy.rollouts import Rollouts
from rollguard.proxy.routing import Router
from rollguard.proxy.settings import Settings
from rollguard.proxy.shadow import ShadowMirror
from rollguard.proxy.windows import Windows
from rollguard.serving.registry import Registry

log = logging.getLogger("rollguard")


class Gateway:
    """Everything one `rollguard serve` runs; `start()`, then `close()` once."""

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self._executor = ThreadPoolExecutor(settings.executor_threads, thread_name_prefix="model")
        self.registry = Registry(
            settings.registry,
            executor=self._executor,
            poll_interval=settings.registry_poll_s,
            inline_below_us=settings.inline_below_us,
            timeout_s=settings.request_timeout_s,
        )
        self.metrics.watch_registry(self.registry)
        self.gauge = LoadGauge()
        self.shadow = ShadowMirror(
            self.metrics,
            concurrency=settings.shadow_concurrency,
            queue=settings.shadow_queue,
            timeout_s=settings.shadow_timeout_s,
            budget=settings.shadow_budget,
            gauge=self.gauge,
        )
        self.inference = Inference(
            self.registry,
            router=Router(),
            metrics=self.metrics,
            windows=Windows(settings.window, settings.agreement_tolerance),
            feedback_capacity=settings.feedback_capacity,
            shadow=self.shadow,
            agreement_tolerance=settings.agreement_tolerance,
            request_ids=RequestIds(),
        )
        self.rollouts = Rollouts(self.inference, settings)
        self.data_plane = DataPlane(self.inference, max_inflight=settings.max_inflight)
        self.admin = Admin(self.rollouts, self.metrics, settings.admin_token)
        self._server = Server(
            self.data_plane.handle,
            self.data_plane.refuse,
            max_body=settings.max_body_bytes,
            header_timeout_s=settings.header_timeout_s,
            keepalive_s=settings.keepalive_s,
        )
        self._listener: asyncio.Server | None = None
        self._admin_listener: asyncio.Server | None = None
        self._admin_runner: web.AppRunner | None = None
        self.port = 0
        self.admin_port = 0

    async def start(self) -> None:
        """Load the registry and the policies, then listen on both ports."""
        settings = self.settings
        await self.registry.start()
        await self.rollouts.start()
        self.gauge.start()
        # Start-up leaves ~10^5 long-lived objects (models, frameworks); moving them out
        # of the collector's reach shortens the collector's pauses under load.
        gc.collect()
        gc.freeze()
        try:
            loop = asyncio.get_running_loop()
            self._listener = await loop.create_server(
                self._server, settings.host, settings.port, reuse_address=True
            )
            self.port = int(self._listener.sockets[0].getsockname()[1])
            runner = web.AppRunner(self.admin.application(), access_log=None)
            await runner.setup()
            self._admin_runner = runner
            assert runner.server is not None  # set up
            self._admin_listener = await loop.create_server(
                runner.server, settings.admin_host, settings.admin_port, reuse_address=True
            )
            self.admin_port = int(self._admin_listener.sockets[0].getsockname()[1])
        except BaseException:
            await self.close()
            raise
        log.info(
            "serving %d model(s) from %s on %s:%d (admin %s:%d)",
            len(self.registry.models()), settings.registry, settings.host, self.port,
            settings.admin_host, self.admin_port,
        )  # fmt: skip

    async def close(self) -> None:
        """Readiness off, stop accepting, let requests in flight finish within the grace
        period, then stop the admin port and the services."""
        self.data_plane.draining = True
        grace = self.settings.shutdown_grace_s
        if self._listener is not None:
            self._listener.close()
            connections = list(self._server.connections)
            for conn in connections:
                conn.shutdown()
            workers = [c.worker for c in connections if c.worker is not None]
            if workers:
                _, pending = await asyncio.wait(workers, timeout=grace)
                for task in pending:
                    task.cancel()
            for conn in list(self._server.connections):
                conn.abort()
            with contextlib.suppress(TimeoutError):  # let closed connections say so
                await asyncio.wait_for(self._listener.wait_closed(), 1.0)
            self._listener = None
        if self._admin_listener is not None:
            self._admin_listener.close()
            self._admin_listener = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        await self.rollouts.stop()
        await self.shadow.drain(1.0)
        self.gauge.stop()
        await self.registry.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
