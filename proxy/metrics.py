"""Prometheus metrics of the gateway, on an injected registry, with label children cached."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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


@dataclass(slots=True)
class VariantMetrics:
    """The label-bound children for one (model, version, role): bound once, reused.

    `inflight` is a plain count the caller adds to and subtracts from; the gauge reads it
    at scrape time, which spares two locked gauge updates per request.
    """

    ok: Counter
    latency: Histogram
    inflight: int = 0


class Metrics:
    """Every rollguard_* series. Bind children once per variant (`variant()`), not per request."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rollguard_requests",
            "Inference requests answered, by outcome code.",
            ["model", "version", "role", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "rollguard_request_duration_seconds",
            "Model call latency in seconds.",
            ["model", "version", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "rollguard_inflight_requests",
            "Requests being processed.",
            ["model", "version", "role"],
            registry=r,
        )
        self.rejected = Counter(
            "rollguard_rejected_requests",
            "Requests refused before reaching a model.",
            ["model", "reason"],
            registry=r,
        )
        self.weight = Gauge(
            "rollguard_candidate_weight_percent",
            "Share of traffic routed to the candidate.",
            ["model", "rollout", "stable", "candidate"],
            registry=r,
        )
        self.shadow = Counter(
            "rollguard_shadow_requests",
            "Shadow copies by result (ok, error, dropped, timeout).",
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
            "Ground-truth labels received, by whether they matched.",
            ["model", "version", "result"],
            registry=r,
        )
        self.decisions = Counter(
            "rollguard_rollout_decisions",
            "Rollout decisions applied, by action.",
            ["rollout", "action"],
            registry=r,
        )
        self.phase = Gauge(
            "rollguard_rollout_phase",
            "1 for the rollout's current phase.",
            ["rollout", "phase"],
            registry=r,
        )
        self.policy_errors = Gauge(
            "rollguard_policy_invalid",
            "1 while a policy file is rejected (file label).",
            ["file"],
            registry=r,
        )
        self.registry_refused = Gauge(
            "rollguard_registry_refused",
            "1 while a registry version is refused.",
            ["model", "version"],
            registry=r,
        )
        self._variants: dict[tuple[str, str, str], VariantMetrics] = {}

    def variant(self, model: str, version: str, role: str) -> VariantMetrics:
        key = (model, version, role)
        found = self._variants.get(key)
        if found is None:
            found = VariantMetrics(
                ok=self.requests.labels(model, version, role, "200"),
                latency=self.latency.labels(model, version, role),
            )
            bound = found  # the closure reads the count at scrape time
            self.inflight.labels(model, version, role).set_function(lambda: bound.inflight)
            self._variants[key] = found
        return found
