"""Prometheus metrics of the gateway, on an injected registry, with label children cached."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from rollguard.proxy.capacity import Capacity
from rollguard.proxy.rollout_metrics import RolloutGauges
from rollguard.serving.availability import Availability

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class VariantMetrics:
    """Requests, latency and in-flight count of one (model, version, role), as plain numbers.

    Every update happens on the event loop thread, so they need no lock: the hot path
    adds to ints and one list slot, and `VariantCollector` turns them into the
    `rollguard_requests_total`, `rollguard_request_duration_seconds` and
    `rollguard_inflight_requests` families at scrape time. prometheus_client's own
    children take a mutex per update, which cost several microseconds a request.
    """

    __slots__ = ("buckets", "codes", "inflight", "labels", "latency_sum", "ok")

    def __init__(self, model: str, version: str, role: str) -> None:
        self.labels = (model, version, role)
        self.ok = 0  # answered 200
        self.codes: dict[str, int] = {}  # every other outcome code
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, not cumulative; +Inf
        self.latency_sum = 0.0
        self.inflight = 0

    def answered(self, latency: float) -> None:
        self.ok += 1
        self.latency_sum += latency
        self.buckets[bisect_left(LATENCY_BUCKETS, latency)] += 1

    def failed(self, code: str, latency: float) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        self.latency_sum += latency
        self.buckets[bisect_left(LATENCY_BUCKETS, latency)] += 1


class VariantCollector(Collector):
    """Exposes every VariantMetrics; registered once per Metrics."""

    def __init__(self, variants: dict[tuple[str, str, str], VariantMetrics]) -> None:
        self._variants = variants

    def describe(self) -> list[Metric]:
        return []  # families are built per scrape; nothing to check for name clashes early

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version", "role"]
        requests = CounterMetricFamily(
            "rollguard_requests",
            "Inference requests answered, by outcome code.",
            labels=[*labels, "code"],
        )
        latency = HistogramMetricFamily(
            "rollguard_request_duration_seconds",
            "Model call latency in seconds.",
            labels=labels,
        )
        inflight = GaugeMetricFamily(
            "rollguard_inflight_requests", "Requests being processed.", labels=labels
        )
        bounds = [*(repr(b) for b in LATENCY_BUCKETS), "+Inf"]
        for variant in list(self._variants.values()):
            values = list(variant.labels)
            requests.add_metric([*values, "200"], variant.ok)
            for code, count in list(variant.codes.items()):
                requests.add_metric([*values, code], count)
            cumulative = list(accumulate(variant.buckets))
            latency.add_metric(
                values, list(zip(bounds, cumulative, strict=True)), variant.latency_sum
            )
            inflight.add_metric(values, variant.inflight)
        yield requests
        yield latency
        yield inflight


class Refusals(Protocol):
    """What the refusal gauge reads: serving/registry.py's `Registry.refused()`."""

    def refused(self) -> dict[tuple[str, str], str]: ...


class RefusalCollector(Collector):
    def __init__(self, registry: Refusals) -> None:
        self._registry = registry

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "rollguard_registry_refused",
            "1 while a registry version is refused (sha256, manifest or load failure).",
            labels=["model", "version"],
        )
        for model, version in sorted(self._registry.refused()):
            family.add_metric([model, version], 1.0)
        yield family


class Versions(Refusals, Protocol):
    """What the availability gauge reads of serving/registry.py's `Registry`."""

    def models(self) -> list[str]: ...

    def versions(self, model: str) -> list[str]: ...

    def availability(self, model: str, version: str) -> Availability: ...


class AvailabilityCollector(Collector):
    """`rollguard_version_available`: 1 per loaded version that can take routed traffic,
    0 while it is stale-refused or unready (an upstream failing its ready probes, or
    ejected for failing calls), with the state as a label."""

    def __init__(self, registry: Versions) -> None:
        self._registry = registry

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "rollguard_version_available",
            "1 while a loaded version can take routed traffic; state: ready, stale, unready.",
            labels=["model", "version", "state"],
        )
        registry = self._registry
        for model in registry.models():
            for version in registry.versions(model):
                state = registry.availability(model, version)
                family.add_metric([model, version, state.value], float(state is Availability.READY))
        yield family


class CapacityCollector(Collector):
    """The data port's connections and buffered bodies (proxy/capacity.py), read at scrape."""

    def __init__(self, capacity: Capacity) -> None:
        self._capacity = capacity

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        c = self._capacity
        yield GaugeMetricFamily(
            "rollguard_connections_open", "Data-port connections open.", value=c.connections
        )
        yield GaugeMetricFamily(
            "rollguard_request_body_buffered_bytes",
            "Request-body bytes held (arriving, queued or being answered), of max_buffered_bytes.",
            value=c.buffered,
        )
        refused = CounterMetricFamily(
            "rollguard_capacity_refusals",
            "Connections (max_connections, max_connections_per_client) and request bodies "
            "(overloaded, buffer_full) refused by the data port's caps, answered 503.",
            labels=["reason"],
        )
        for why, count in c.refused.items():
            refused.add_metric([why.value], count)
        yield refused
        timed_out = CounterMetricFamily(
            "rollguard_connection_timeouts",
            "Data-port connections closed by a time limit: head, body (408) or idle.",
            labels=["phase"],
        )
        for phase, count in c.timed_out.items():
            timed_out.add_metric([phase], count)
        yield timed_out


class Metrics:
    """Every rollguard_* series. Bind children once per variant (`variant()`), not per request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = self.registry
        self.rejected = Counter(
            "rollguard_rejected_requests",
            "Requests refused before reaching a model.",
            ["model", "reason"],
            registry=r,
        )
        self.shadow = Counter(
            "rollguard_shadow_requests",
            "Shadow copies by result (ok, error, timeout, unavailable, dropped, shed).",
            ["model", "version", "result"],
            registry=r,
        )
        self.agreement = Gauge(
            "rollguard_shadow_agreement_ratio",
            "Share of shadow answers equal to the primary's.",
            ["model", "version"],
            registry=r,
        )
        self.feedback = Counter(
            "rollguard_feedback_labels",
            "Ground-truth labels received, a row each, by whether they matched.",
            ["model", "version", "result"],
            registry=r,
        )
        self.feedback_expired = Counter(
            "rollguard_feedback_expired_labels",
            "Labels for requests the feedback index had forgotten (its feedback_capacity "
            "or feedback_max_age_s bound), answered 410.",
            ["model"],
            registry=r,
        )
        self.decisions = Counter(
            "rollguard_rollout_decisions",
            "Rollout decisions applied, by action.",
            ["rollout", "action"],
            registry=r,
        )
        self.failovers = Counter(
            "rollguard_failover_requests",
            "Requests the split gave a candidate that could not take them, served by the "
            "stable instead, by why (missing, loading, refused, stale, unready); and those "
            "it gave a stable the registry has no load of, served by the model's default "
            "version (stable_missing, stable_refused, stable_loading).",
            ["model", "version", "reason"],
            registry=r,
        )
        self.unavailable_requests = Counter(
            "rollguard_unavailable_requests",
            "Requests answered 503 because the version that had to answer could not: "
            "refused (its files failed verification), loading, unready (an upstream failing "
            "its probes or ejected), or no_production (no default version); the version is "
            '"" for a model with no default. Routed candidates fail over instead '
            "(rollguard_failover_requests_total).",
            ["model", "version", "role", "reason"],
            registry=r,
        )
        self.shared_failures = Counter(
            "rollguard_shared_failures",
            "Routed requests that failed on their version and then on the rollout's other "
            "version too: the input's fault, or a fault the two share, counted against "
            "neither's error rate or upstream health (model errors answered 400, upstream "
            "errors 502), by the role that answered first.",
            ["model", "role"],
            registry=r,
        )
        self.rollouts = RolloutGauges(r)
        self.audit_chain_ok = Gauge(
            "rollguard_audit_chain_ok",
            "1 when the audit chain verified at start (a repaired torn tail counts as intact).",
            registry=r,
        )
        self.fleet_redis_up = Gauge(
            "rollguard_fleet_redis_up",
            "Fleet mode (state: redis://): 1 while Redis answers, 0 during an outage "
            "(routing keeps the last weights, nothing is decided).",
            registry=r,
        )
        self.fleet_decider = Gauge(
            "rollguard_fleet_decider",
            "Fleet mode: 1 while this process holds the rollout's decider lease.",
            ["rollout"],
            registry=r,
        )
        self.policy_errors = Gauge(
            "rollguard_policy_invalid",
            "1 while a policy file is rejected (file label).",
            ["file"],
            registry=r,
        )
        self.webhooks = Counter(
            "rollguard_webhook_deliveries",
            "Webhook deliveries by result: delivered, failed (after retries), refused (a "
            "host not allowed, the gateway's own port, a redirect, a missing secret), dropped.",
            ["result"],
            registry=r,
        )
        # The process's own CPU, memory, file descriptors and collector, on this registry
        # (the default registry has them; a custom one has only what is put in it).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._variants: dict[tuple[str, str, str], VariantMetrics] = {}
        self._failovers: dict[tuple[str, str, str], Counter] = {}
        r.register(VariantCollector(self._variants))

    def watch_registry(self, registry: Versions) -> None:
        """Export `rollguard_registry_refused` (1 per version the registry refuses) and
        `rollguard_version_available`, read at scrape time from the registry itself, so
        they cannot drift from it."""
        self.registry.register(RefusalCollector(registry))
        self.registry.register(AvailabilityCollector(registry))

    def failover(self, model: str, version: str, reason: str) -> Counter:
        """The failover counter's child for a candidate and a reason (cached: per request)."""
        key = (model, version, reason)
        found = self._failovers.get(key)
        if found is None:
            found = self._failovers[key] = self.failovers.labels(*key)
        return found

    def watch_capacity(self, capacity: Capacity) -> None:
        """Export the data port's connection and body-buffer counts, read at scrape time."""
        self.registry.register(CapacityCollector(capacity))

    def variant(self, model: str, version: str, role: str) -> VariantMetrics:
        key = (model, version, role)
        found = self._variants.get(key)
        if found is None:
            found = self._variants[key] = VariantMetrics(model, version, role)
        return found
