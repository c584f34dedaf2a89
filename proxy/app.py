"""The aiohttp application: middleware (limits, ids, error mapping) and start/stop of services."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rollguard.proxy import admin, dataplane
from rollguard.proxy.guard import LIMITS, Limits, error_reply, reply_for
from rollguard.proxy.inference import Inference, RequestIds
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.rollouts import Rollouts
from rollguard.proxy.settings import Settings
from rollguard.proxy.shadow import LoadGauge, ShadowMirror
from rollguard.proxy.state import (
    GATEWAY,
    REQUEST_ID,
    REQUEST_ID_HEADER,
    ROLLOUTS,
    SETTINGS,
    Guard,
    Handler,
)
from rollguard.serving.registry import Registry

log = logging.getLogger("rollguard")


def _guard(limits: Limits, new_id: RequestIds) -> Guard:
    """Wraps every handler: body and in-flight limits, request ids, errors to statuses.

    A wrapper per route rather than an aiohttp middleware: with no middleware aiohttp
    calls the handler directly, without building a chain of partials per request. The
    limits and error replies are proxy/guard.py's, shared with the fast path.
    """

    def guard(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            request[REQUEST_ID] = request.headers.get(REQUEST_ID_HEADER)
            try:
                limits.check_length(request.content_length)
                limits.enter(request.match_info.get("model", ""), request.method == "POST")
                try:
                    response = await handler(request)
                finally:
                    limits.leave()
                if REQUEST_ID_HEADER not in response.headers:
                    response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID] or new_id()
                return response
            except web.HTTPRequestEntityTooLarge:
                request_id = request[REQUEST_ID] or new_id()
                return error_reply(413, limits.too_large_message(), request_id).to_response()
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                reply = error_reply(exc.status, exc.reason, request[REQUEST_ID] or new_id())
                response = reply.to_response()
                if "Allow" in exc.headers:
                    response.headers["Allow"] = exc.headers["Allow"]
                return response
            except Exception as exc:
                what = f"{request.method} {request.path}"
                return reply_for(exc, request[REQUEST_ID] or new_id(), what).to_response()

        return guarded

    return guard


async def _unmatched(request: web.Request) -> web.StreamResponse:
    """Every path no route takes: 405 naming the allowed methods, else 404 (as JSON)."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is request.match_info.route.resource:
            continue
        _, methods = await resource.resolve(request)
        allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound(reason=f"no route for {request.method} {request.path}")


async def _metrics(request: web.Request) -> web.Response:
    registry = request.app[GATEWAY].metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None) -> web.Application:
    """The gateway application; services start in its cleanup context."""
    metrics = Metrics(registry)
    request_ids = RequestIds()
    app = web.Application(client_max_size=settings.max_body_bytes)
    limits = Limits(settings, metrics)
    guard = _guard(limits, request_ids)
    app[SETTINGS] = settings
    app[LIMITS] = limits

    async def services(app: web.Application) -> AsyncIterator[None]:
        executor = ThreadPoolExecutor(settings.executor_threads, thread_name_prefix="model")
        models = Registry(
            settings.registry,
            executor=executor,
            poll_interval=settings.registry_poll_s,
            inline_below_us=settings.inline_below_us,
        )
        gauge = LoadGauge()
        gauge.start()
        shadow = ShadowMirror(
            metrics,
            concurrency=settings.shadow_concurrency,
            queue=settings.shadow_queue,
            timeout_s=settings.shadow_timeout_s,
            budget=settings.shadow_budget,
            gauge=gauge,
        )
        gateway = Inference(
            models,
            metrics=metrics,
            timeout_s=settings.request_timeout_s,
            window_size=settings.window,
            feedback_capacity=settings.feedback_capacity,
            shadow=shadow,
            agreement_tolerance=settings.agreement_tolerance,
            request_ids=request_ids,
        )
        rollouts = Rollouts(gateway, settings)
        app[GATEWAY] = gateway
        app[ROLLOUTS] = rollouts
        await models.start()
        await rollouts.start()
        # Start-up leaves ~10^5 long-lived objects (models, frameworks); moving them out of
        # the collector's reach cut the worst GC pause under load from ~85 ms to ~15 ms
        # (load_tests/results/bench.md, rollguard-gc-frozen).
        gc.collect()
        gc.freeze()
        log.info(
            "serving %d model(s) from %s on %s:%d",
            len(models.models()),
            settings.registry,
            settings.host,
            settings.port,
        )
        try:
            yield
        finally:
            await rollouts.stop()
            await shadow.drain(1.0)
            gauge.stop()
            await models.stop()
            executor.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(services)
    dataplane.add_routes(app, guard)
    admin.add_routes(app, guard)
    app.router.add_get("/metrics", guard(_metrics))
    app.router.add_route("*", "/{tail:.*}", guard(_unmatched))  # last: only what nothing took
    return app
