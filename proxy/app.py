"""The aiohttp application: middleware (limits, ids, error mapping) and start/stop of services."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from proxy import admin, dataplane
from proxy.errors import RETRY_AFTER_S, BodyTooLarge, TooBusy, status_for
from proxy.gateway import Gateway, RequestIds, variant_of
from proxy.metrics import Metrics
from proxy.rollouts import Rollouts
from proxy.settings import Settings
from proxy.shadow import LoadGauge, ShadowMirror
from proxy.state import (
    GATEWAY,
    REQUEST_ID,
    REQUEST_ID_HEADER,
    ROLLOUTS,
    SETTINGS,
    VARIANT_HEADER,
    Guard,
    Handler,
)
from serving.errors import ModelExecutionError
from serving.registry import Registry

log = logging.getLogger("rollguard")


def _error(
    status: int, message: str, request_id: str | None, variant: str | None = None
) -> web.Response:
    response = web.Response(
        body=orjson.dumps({"error": message}), status=status, content_type="application/json"
    )
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    if variant:
        response.headers[VARIANT_HEADER] = variant
    if status == 503:
        response.headers["Retry-After"] = RETRY_AFTER_S
    return response


def _guard(settings: Settings, metrics: Metrics, new_id: RequestIds) -> Guard:
    """Wraps every handler: body and in-flight limits, request ids, errors to statuses.

    A wrapper per route rather than an aiohttp middleware: with no middleware aiohttp
    calls the handler directly, without building a chain of partials per request.
    """
    inflight = 0
    limit = settings.max_inflight
    max_body = settings.max_body_bytes

    def guard(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            nonlocal inflight
            request[REQUEST_ID] = request.headers.get(REQUEST_ID_HEADER)
            try:
                length = request.content_length
                if length is not None and length > max_body:
                    raise BodyTooLarge(f"body of {length} bytes exceeds the limit of {max_body}")
                if inflight >= limit and request.method == "POST":
                    model = request.match_info.get("model", "")
                    metrics.rejected.labels(model, "overloaded").inc()
                    raise TooBusy(f"{inflight} requests in flight, the limit is {limit}")
                inflight += 1
                try:
                    response = await handler(request)
                finally:
                    inflight -= 1
                if REQUEST_ID_HEADER not in response.headers:
                    response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID] or new_id()
                return response
            except web.HTTPRequestEntityTooLarge:
                return _error(
                    413,
                    f"body exceeds the limit of {max_body} bytes",
                    request[REQUEST_ID] or new_id(),
                )
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                response = _error(exc.status, exc.reason, request[REQUEST_ID] or new_id())
                if "Allow" in exc.headers:
                    response.headers["Allow"] = exc.headers["Allow"]
                return response
            except Exception as exc:
                status = status_for(exc)
                if status == 500 and not isinstance(exc, ModelExecutionError):
                    log.exception("%s %s failed", request.method, request.path)
                return _error(status, str(exc), request[REQUEST_ID] or new_id(), variant_of(exc))

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
    guard = _guard(settings, metrics, request_ids)
    app[SETTINGS] = settings

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
        gateway = Gateway(
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
