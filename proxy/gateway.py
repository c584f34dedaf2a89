"""One rollguard process: its services, the data port and the admin port, started and stopped.

Both ports are served end to end by rollguard's own HTTP/1.1 protocol (proxy/protocol.py):
the data port in front of `DataPlane`, the admin port in front of `Admin` (proxy/admin.py),
each with its own limits. Every setting comes from `Settings` and is handed to the
constructors.

Stopping (`rollguard serve` on SIGTERM): `drain()` turns readiness to 503 while both
ports keep serving for `drain_delay_s` (answers close their connections, so clients
reconnect to where the endpoints now point); `close()` then stops listening, lets the
requests in flight finish within `shutdown_grace_s`, answers the rest 503 and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import resource
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from rollguard.proxy import admin
from rollguard.proxy.admin import Admin
from rollguard.proxy.auth import Authenticator
from rollguard.proxy.capacity import Capacity
from rollguard.proxy.endpoints import DataPlane
from rollguard.proxy.inference import Inference, RequestIds
from rollguard.proxy.limits import RateLimiter
from rollguard.proxy.load import LoadGauge
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.protocol import Server
from rollguard.proxy.rollouts import Rollouts
from rollguard.proxy.routing import Router
from rollguard.proxy.settings import Settings
from rollguard.proxy.shadow import ShadowMirror
from rollguard.proxy.windows import Windows
from rollguard.serving.bulkhead import Isolation
from rollguard.serving.registry import Registry

if TYPE_CHECKING:
    from rollguard.proxy.grpc_endpoints import GrpcServer

log = logging.getLogger("rollguard")


class Gateway:
    """Everything one `rollguard serve` runs; `start()`, then `close()` once."""

    def __init__(self, settings: Settings, *, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self.registry = Registry(
            settings.registry,
            threads=settings.executor_threads,
            isolation=Isolation(
                concurrency=settings.version_concurrency,
                queue=settings.version_queue,
                shadow_concurrency=settings.shadow_concurrency,
                shadow_queue=settings.shadow_queue,
                shadow_threads=settings.shadow_threads,
            ),
            poll_interval=settings.registry_poll_s,
            inline_below_us=settings.inline_below_us,
            timeout_s=settings.request_timeout_s,
        )
        self.metrics.watch_registry(self.registry)
        self.gauge = LoadGauge(threshold=settings.shadow_pressure)
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
            feedback_max_age_s=settings.feedback_max_age_s,
            shadow=self.shadow,
            agreement_tolerance=settings.agreement_tolerance,
            request_ids=RequestIds(),
        )
        self.rollouts = Rollouts(self.inference, settings)
        self.data_plane = DataPlane(
            self.inference,
            max_inflight=settings.max_inflight,
            auth=Authenticator(
                settings.data_auth,
                jwt_secret=settings.jwt_secret,
                tiers=settings.rate_limits.tiers if settings.rate_limits.enabled else None,
            ),
            limiter=RateLimiter(settings.rate_limits),
            forward_headers=settings.forward_headers
            + (("authorization",) if settings.forward_authorization else ()),
            strict_readiness=settings.strict_readiness,
            readiness_details=self.rollouts.readiness if self.rollouts.fleet else None,
        )
        self.admin = Admin(self.rollouts, self.metrics, settings)
        plane = self.data_plane
        self.capacity = Capacity(
            max_connections=_fit_to_descriptors(settings.max_connections),
            max_connections_per_client=settings.max_connections_per_client,
            max_buffered_bytes=settings.max_buffered_bytes,
            max_inflight=settings.max_inflight,
            inflight=lambda: plane.inflight,
        )
        self.metrics.watch_capacity(self.capacity)
        self._server = Server(
            plane.handle,
            plane.refuse,
            max_body=settings.max_body_bytes,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            keepalive_s=settings.keepalive_s,
            capacity=self.capacity,
        )
        # The admin port: the same server, with limits for a few operators' clients.
        self.admin_capacity = admin.capacity()
        self._admin_server = Server(
            self.admin.handle,
            self.admin.refuse,
            max_body=admin.MAX_BODY_BYTES,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            keepalive_s=settings.keepalive_s,
            capacity=self.admin_capacity,
        )
        self._grpc: GrpcServer | None = None
        if settings.grpc_enabled:
            # Imported for the port only: grpc and protobuf take about 11 MiB and 0.1 s at
            # start, which a gateway without the gRPC port need not pay.
            from rollguard.proxy import grpc_endpoints

            self._grpc = grpc_endpoints.GrpcServer(
                plane,
                max_message_bytes=settings.max_body_bytes,
                idle_s=settings.keepalive_s,
                max_streams=settings.max_inflight,
            )
        self._hurry = asyncio.Event()
        self._trimmer: asyncio.Task[None] | None = None
        self._listener: asyncio.Server | None = None
        self._admin_listener: asyncio.Server | None = None
        self.port = 0
        self.admin_port = 0
        self.grpc_port = 0  # 0 while gRPC is off

    async def start(self) -> None:
        """Load the registry and the policies, then listen: the admin and gRPC ports,
        then the data port (whose readiness says the gateway is up)."""
        settings = self.settings
        await self.registry.start()
        await self.rollouts.start()
        self.gauge.start()
        # Start-up leaves ~10^5 long-lived objects (models, frameworks); moving them out
        # of the collector's reach shortens the collector's pauses under load.
        gc.collect()
        gc.freeze()
        self._trimmer = asyncio.create_task(_trim_after_bursts(self.capacity))
        try:
            loop = asyncio.get_running_loop()
            # `serve --workers N`: every worker listens on the one data and gRPC port
            # (the kernel spreads connections over them); the admin port is its own.
            shared = settings.workers > 1
            # The data port listens last: its readiness is what probes and load balancers
            # read, and it must not say ready while the admin or gRPC port is not yet up.
            self._admin_listener = await loop.create_server(
                self._admin_server, settings.admin_host, settings.admin_port, reuse_address=True
            )
            self.admin_port = int(self._admin_listener.sockets[0].getsockname()[1])
            self.rollouts.own_ports.add(self.admin_port)  # webhooks never reach our listeners
            if self._grpc is not None:
                self.grpc_port = await self._grpc.start(
                    settings.grpc_host or settings.host, settings.grpc_port, reuse_port=shared
                )
                self.rollouts.own_ports.add(self.grpc_port)
            self._listener = await loop.create_server(
                self._server, settings.host, settings.port, reuse_address=True, reuse_port=shared
            )
            self.port = int(self._listener.sockets[0].getsockname()[1])
            self.rollouts.own_ports.add(self.port)
        except BaseException:
            await self.close()
            raise
        # Start-up's garbage (parsed manifests and policies, import-time temporaries)
        # is freed by now; hand its free heap pages back to the system (glibc).
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        grpc_at = (
            f"{settings.grpc_host or settings.host}:{self.grpc_port}" if self.grpc_port else "off"
        )
        log.info(
            "serving %d model(s) from %s on %s:%d (admin %s:%d, gRPC %s)",
            len(self.registry.models()), settings.registry, settings.host, self.port,
            settings.admin_host, self.admin_port, grpc_at,
        )  # fmt: skip

    async def drain(self) -> None:
        """Readiness answers 503 while both ports keep serving, for `drain_delay_s` (or
        until `hurry`): long enough for load balancers to stop sending new requests."""
        self.data_plane.draining = self._server.draining = True
        delay = self.settings.drain_delay_s
        if self._listener is None or delay <= 0 or self._hurry.is_set():
            return
        log.info("draining: readiness is 503; still serving for %gs", delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), delay)

    def hurry(self) -> None:
        """End the drain delay now (a second signal)."""
        self._hurry.set()

    async def close(self) -> None:
        """Readiness off, stop accepting, let requests in flight finish within the grace
        period (those still running then are answered 503; gRPC calls are cancelled),
        then stop the admin port and the services."""
        self.data_plane.draining = self._server.draining = True
        grace = self.settings.shutdown_grace_s
        grpc_stopped = (
            asyncio.ensure_future(self._grpc.stop(grace)) if self._grpc is not None else None
        )
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await _stop_serving(listener, self._server, grace, "data port")
        if grpc_stopped is not None:
            await grpc_stopped
        if self._admin_listener is not None:
            # Requests being answered (an action writing its state and entry) finish too.
            listener, self._admin_listener = self._admin_listener, None
            await _stop_serving(listener, self._admin_server, grace, "admin port")
        if self._trimmer is not None:
            self._trimmer.cancel()
            self._trimmer = None
        await self.rollouts.stop()
        await self.shadow.drain(1.0)
        self.gauge.stop()
        await self.registry.stop()


async def _stop_serving(listener: asyncio.Server, server: Server, grace: float, what: str) -> None:
    """Stop accepting; let the requests in flight finish within `grace` (those still
    running then are answered 503), then close every connection of `server`."""
    listener.close()
    connections = list(server.connections)
    for conn in connections:
        conn.shutdown()
    workers = [c.worker for c in connections if c.worker is not None]
    if workers:
        log.info("%s: waiting up to %gs for %d request(s) in flight", what, grace, len(workers))
        _, pending = await asyncio.wait(workers, timeout=grace)
        for conn in connections:
            if conn.worker in pending:
                conn.give_up()
        if pending:
            log.warning("%s: %d request(s) still running after shutdown_grace_s=%g: "
                        "answered 503", what, len(pending), grace)  # fmt: skip
            await asyncio.wait(pending, timeout=1.0)
    for conn in list(server.connections):
        conn.abort()
    with contextlib.suppress(TimeoutError):  # let closed connections say so
        await asyncio.wait_for(listener.wait_closed(), 1.0)


FD_RESERVE = 256  # descriptors kept for what is not a client: files, upstreams, admin


def _fit_to_descriptors(max_connections: int) -> int:
    """`max_connections`, with the process's open-file limit raised to hold them (up to
    its hard limit); lowered, with a warning, when the limit cannot be raised: the cap
    must bite before the descriptors run out, or the registry and policy scans fail."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + FD_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= want:
        return max_connections
    raised = want if hard == resource.RLIM_INFINITY else min(want, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    if soft >= want:
        return max_connections
    fitted = max(1, soft - FD_RESERVE)
    log.warning("max_connections=%d does not fit the open-file limit %d: using %d",
                max_connections, soft, fitted)  # fmt: skip
    return fitted


BURST_BYTES = 16 * 1024 * 1024  # request bodies buffered at once that count as a burst
TRIM_EVERY_S = 2.0


async def _trim_after_bursts(capacity: Capacity) -> None:
    """Give the memory of a burst of large request bodies back to the system once it is
    over. glibc keeps freed heap memory for reuse: 1 MiB and larger blocks are mapped
    on their own (freed at once, see `_libc`), and after a burst `malloc_trim` returns
    the smaller pieces the bodies arrived in."""
    libc = _libc()
    if libc is None:
        return
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(TRIM_EVERY_S)
        if capacity.high_water >= BURST_BYTES and capacity.buffered <= capacity.high_water // 4:
            capacity.high_water = capacity.buffered
            await loop.run_in_executor(None, libc.malloc_trim, 0)


def _libc() -> ctypes.CDLL | None:
    """glibc, with every allocation of 1 MiB or more (request bodies) served from its own
    mapping, so that freeing it returns it to the system at once. By default glibc raises
    that threshold to the largest block freed (up to 32 MiB), after which a burst of
    large bodies grows a heap that is never given back. None: not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallopt, _ = libc.mallopt, libc.malloc_trim  # glibc's; AttributeError elsewhere
    except (OSError, AttributeError):
        return None
    m_mmap_threshold = -3
    if not mallopt(m_mmap_threshold, 1024 * 1024):
        log.debug("mallopt(M_MMAP_THRESHOLD) was refused")
    return libc
