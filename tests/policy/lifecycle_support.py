"""A rollout driven through policy.lifecycle with the gateway's side as plain data."""

from __future__ import annotations

from typing import Any

import numpy as np

from rollguard.policy import lifecycle
from rollguard.policy.decide import Action, Decision
from rollguard.policy.effects import Audit, Effect, ResetWindows, Route, Save, SetLatencyThreshold
from rollguard.policy.evidence import Evidence, VariantEvidence
from rollguard.policy.schema import Rollout
from rollguard.policy.state import Phase, RolloutState

T0 = 1_700_000_000.0
TICK = 20.0  # seconds per tick
PER_TICK = 1000  # requests served per tick, split by the routed weight


def make_rollout(**spec: Any) -> Rollout:
    base: dict[str, Any] = {
        "model": "fraud",
        "stable": "1.0.0",
        "candidate": "1.1.0",
        "key": "header:x-user-id",
        "steps": [
            {"weight": 10, "hold": "60s", "min_requests": 300},
            {"weight": 50, "hold": "60s"},
            {"weight": 100, "hold": "20s"},
        ],
        "checks": [
            {"metric": "error_rate", "max": 0.05, "on_fail": "rollback"},
            {"metric": "latency_p99", "max": 0.5, "on_fail": "rollback"},
        ],
    }
    document = {"apiVersion": "rollguard/v1", "kind": "Rollout", "metadata": {"name": "fraud"}}
    return Rollout.model_validate({**document, "spec": base | spec})


class Traffic:
    """Counters the test serves into and reads Evidence from; effects land here.

    A Route sets the weight that splits the next requests, a latency threshold
    restarts the slow counts, ResetWindows zeroes everything, as the gateway does.
    """

    def __init__(self, *, candidate_error_rate: float = 0.0, stable_p99: float = 0.05) -> None:
        self.candidate_error_rate = candidate_error_rate
        self.counts = {v: dict.fromkeys(("requests", "errors", "since", "over"), 0) for v in "sc"}
        rng = np.random.default_rng(7)
        self.stable_latencies = rng.lognormal(np.log(stable_p99 / 3), 0.45, size=2000)
        self.weights: list[float] = []  # every change of the routed weight
        self.thresholds: list[float | None] = []
        self.resets = 0

    @property
    def weight(self) -> float:
        return self.weights[-1] if self.weights else 0.0

    @property
    def threshold(self) -> float | None:
        return self.thresholds[-1] if self.thresholds else None

    def serve(self, n: int = PER_TICK) -> None:
        to_candidate = round(n * self.weight / 100)
        for variant, count, rate in (
            ("s", n - to_candidate, 0.0),
            ("c", to_candidate, self.candidate_error_rate),
        ):
            c = self.counts[variant]
            c["requests"] += count
            c["errors"] += round(count * rate)
            if self.threshold is not None:
                c["since"] += count

    def evidence(self) -> Evidence:
        def variant(key: str, version: str, latencies: np.ndarray) -> VariantEvidence:
            c = self.counts[key]
            return VariantEvidence(
                version,
                requests=c["requests"],
                errors=c["errors"],
                latency_threshold=self.threshold,
                since_threshold=c["since"],
                over_threshold=c["over"],
                latencies=latencies,
            )

        stable = variant("s", "1.0.0", self.stable_latencies)
        candidate = variant("c", "1.1.0", self.stable_latencies[:500])
        return Evidence(stable, candidate, candidate_weight=self.weight)

    def route(self, weight: float) -> None:
        if not self.weights or self.weights[-1] != weight:  # the shell publishes changes only
            self.weights.append(weight)

    def set_latency_threshold(self, seconds: float | None) -> None:
        self.thresholds.append(seconds)
        for c in self.counts.values():
            c["since"] = c["over"] = 0

    def reset_windows(self) -> None:
        self.resets += 1
        for c in self.counts.values():
            c.update(dict.fromkeys(c, 0))


class Env:
    """One rollout over the pure core: holds its state, records what the effects did."""

    def __init__(self, rollout: Rollout, traffic: Traffic | None = None) -> None:
        self.now = T0
        self.traffic = traffic or Traffic()
        self.saved: RolloutState | None = None  # what the store would hold
        self.audits: list[Audit] = []
        self.effects: list[Effect] = []
        self.rollout = rollout
        self.state = self.run(lifecycle.begin(rollout, self.now))

    def run(self, transition: lifecycle.Transition) -> RolloutState:
        for effect in transition.effects:
            self.effects.append(effect)
            if isinstance(effect, Save):
                self.saved = effect.state
            elif isinstance(effect, Audit):
                self.audits.append(effect)
            elif isinstance(effect, Route):
                self.traffic.route(effect.weight)
            elif isinstance(effect, ResetWindows):
                self.traffic.reset_windows()
            elif isinstance(effect, SetLatencyThreshold):
                self.traffic.set_latency_threshold(effect.seconds)
        self.state = transition.state
        return self.state

    def restart(self, rollout: Rollout, traffic: Traffic | None = None) -> None:
        """A new process: the saved state restored under `rollout`, fresh counters."""
        assert self.saved is not None
        self.traffic = traffic or self.traffic
        self.rollout = rollout
        self.run(lifecycle.restore(rollout, self.saved, self.now))

    def tick(self) -> Decision:
        transition = lifecycle.tick(self.rollout, self.state, self.traffic.evidence(), self.now)
        self.run(transition)
        return transition.decision

    def act(self, action: str, actor: str) -> Decision:
        transition = lifecycle.act(self.rollout, self.state, action, actor, self.now)
        self.run(transition)
        return transition.decision

    def edit(self, rollout: Rollout, candidate: str | None = None) -> None:
        self.run(lifecycle.edit(self.rollout, self.state, rollout, self.now, candidate))
        self.rollout = rollout

    def run_until(self, phases: set[Phase], max_ticks: int = 60) -> list[Action]:
        """Serve and tick until the rollout reaches one of `phases`; the actions seen."""
        actions = []
        for _ in range(max_ticks):
            self.traffic.serve()
            self.now += TICK
            actions.append(self.tick().action)
            if self.state.phase in phases:
                return actions
        raise AssertionError(f"still {self.state.phase} after {max_ticks} ticks")

    def run_to_step(self, step: int, max_ticks: int = 60) -> None:
        for _ in range(max_ticks):
            if self.state.step >= step:
                return
            self.run_until({Phase.PROGRESSING, Phase.AWAITING_APPROVAL}, max_ticks=1)
        raise AssertionError(f"still at step {self.state.step} after {max_ticks} ticks")

    def entries(self, kind: str) -> list[Audit]:
        return [a for a in self.audits if a.kind == kind]
