"""RolloutController with a real StateStore and AuditLog: decisions persisted, audited, applied."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rollguard.policy.audit import AuditLog, read_entries, verify
from rollguard.policy.controller import RolloutController
from rollguard.policy.decide import Action
from rollguard.policy.errors import ActionRejected, StateError
from rollguard.policy.evidence import Evidence, VariantEvidence
from rollguard.policy.schema import Rollout
from rollguard.policy.state import Phase
from rollguard.policy.store import StateStore

T0 = 1_700_000_000.0
TICK = 20.0  # seconds of clock per tick
PER_TICK = 1000  # requests served per tick, split by the applied weight


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


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Traffic:
    """The gateway's side as plain data: counters the test serves into, Evidence out.

    The controller's callbacks land here the way the gateway's would: the applied
    weight splits the next requests, the latency threshold restarts the slow counts.
    """

    def __init__(self, *, candidate_error_rate: float = 0.0, stable_p99: float = 0.05) -> None:
        self.candidate_error_rate = candidate_error_rate
        self.counts = {v: dict.fromkeys(("requests", "errors", "since", "over"), 0) for v in "sc"}
        rng = np.random.default_rng(7)
        self.stable_latencies = rng.lognormal(np.log(stable_p99 / 3), 0.45, size=2000)
        self.weight: float | None = None
        self.threshold: float | None = None
        self.weights: list[float] = []  # every apply_weight call
        self.thresholds: list[float | None] = []
        self.resets = 0
        self.notified: list[dict[str, Any]] = []

    def serve(self, n: int = PER_TICK) -> None:
        to_candidate = round(n * (self.weight or 0.0) / 100)
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
        return Evidence(stable, candidate, candidate_weight=self.weight or 0.0)

    def apply_weight(self, weight: float) -> None:
        self.weight = weight
        self.weights.append(weight)

    def set_latency_threshold(self, seconds: float | None) -> None:
        self.threshold = seconds
        self.thresholds.append(seconds)
        for c in self.counts.values():
            c["since"] = c["over"] = 0

    def reset_windows(self) -> None:
        self.resets += 1
        for c in self.counts.values():
            c.update(dict.fromkeys(c, 0))


class Env:
    """One gateway process: a store, an audit log and a controller over `traffic`."""

    def __init__(self, root: Path, traffic: Traffic, clock: Clock, rollout: Rollout) -> None:
        self.root, self.traffic, self.clock = root, traffic, clock
        self.store = StateStore(root / "state")
        self.audit = AuditLog(root / "audit.jsonl", clock)
        self.controller = self.start(rollout)

    def start(self, rollout: Rollout) -> RolloutController:
        return RolloutController(
            rollout,
            store=self.store,
            audit=self.audit,
            evidence=self.traffic.evidence,
            apply_weight=self.traffic.apply_weight,
            set_latency_threshold=self.traffic.set_latency_threshold,
            reset_windows=self.traffic.reset_windows,
            notify=self.traffic.notified.append,
            clock=self.clock,
        )

    def restart(self, rollout: Rollout, traffic: Traffic | None = None) -> None:
        """A new process over the same state directory and audit log."""
        self.audit.close()
        self.traffic = traffic or self.traffic
        self.store = StateStore(self.root / "state")
        self.audit = AuditLog(self.root / "audit.jsonl", self.clock)
        self.controller = self.start(rollout)

    def run_until(self, phases: set[Phase], max_ticks: int = 60) -> list[Action]:
        """Serve and tick until the rollout reaches one of `phases`; the actions seen."""
        actions = []
        for _ in range(max_ticks):
            self.traffic.serve()
            self.clock.now += TICK
            actions.append(self.controller.tick().action)
            if self.controller.state.phase in phases:
                return actions
        raise AssertionError(f"still {self.controller.state.phase} after {max_ticks} ticks")

    def run_to_step(self, step: int, max_ticks: int = 60) -> None:
        for _ in range(max_ticks):
            if self.controller.state.step >= step:
                return
            self.run_until({Phase.PROGRESSING, Phase.AWAITING_APPROVAL}, max_ticks=1)
        raise AssertionError(f"still at step {self.controller.state.step} after {max_ticks} ticks")

    def entries(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in read_entries(self.audit.path) if kind is None or e["kind"] == kind]

    def saved_phase(self) -> str:
        saved = self.store.load("fraud")
        assert saved is not None
        return str(saved["phase"])


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    environment = Env(tmp_path, Traffic(), Clock(), make_rollout())
    yield environment
    environment.audit.close()


def test_a_good_canary_walks_to_promotion(env: Env) -> None:
    assert env.traffic.weights == [10]  # the first step is applied at construction
    actions = env.run_until({Phase.PROMOTED})
    assert [a for a in actions if a is not Action.NONE] == [
        Action.ADVANCE,
        Action.ADVANCE,
        Action.PROMOTE,
    ]
    assert env.traffic.weights == [10, 50, 100]
    assert env.saved_phase() == "promoted"
    # The absolute latency bound is frozen once, as the threshold, and audited.
    assert env.traffic.thresholds == [None, 0.5]
    assert [e["data"]["threshold"] for e in env.entries("threshold")] == [0.5]
    # Every decision is audited with the check results it was made from.
    decisions = env.entries("decision")
    assert [e["data"]["action"] for e in decisions] == ["advance", "advance", "promote"]
    for entry in decisions:
        assert {c["metric"]: c["verdict"] for c in entry["data"]["checks"]} == {
            "error_rate": "pass",
            "latency_p99": "pass",
        }
        assert entry["actor"] == "engine" and entry["data"]["reason"]
    assert [r["data"]["action"] for r in env.traffic.notified if r["kind"] == "decision"] == [
        "advance",
        "advance",
        "promote",
    ]
    assert verify(env.audit.path).ok


def test_a_bad_canary_rolls_back(tmp_path: Path) -> None:
    env = Env(tmp_path, Traffic(candidate_error_rate=0.3), Clock(), make_rollout())
    actions = env.run_until({Phase.ROLLED_BACK})
    assert actions[-1] is Action.ROLLBACK
    assert env.traffic.weights == [10, 0]
    assert env.saved_phase() == "rolled_back"
    (entry,) = env.entries("decision")
    assert entry["data"]["reason"].startswith("rollback: error_rate 0.3 vs 0.05 fail")
    failed = [c for c in entry["data"]["checks"] if c["verdict"] == "fail"]
    assert [c["metric"] for c in failed] == ["error_rate"]
    assert env.traffic.notified[-1]["data"]["action"] == "rollback"
    # Later ticks change nothing: rolled back is terminal.
    for _ in range(3):
        env.traffic.serve()
        env.clock.now += TICK
        assert not env.controller.tick().changed
    assert len(env.entries("decision")) == 1
    env.audit.close()


def test_a_restart_resumes_at_the_same_step(env: Env) -> None:
    env.run_to_step(1)
    before = env.controller.state
    env.restart(make_rollout(), Traffic())  # a new process: the gateway's counters are empty
    assert env.controller.state == before
    assert env.traffic.weights == [50]  # applied at once on start-up
    assert env.traffic.thresholds == [0.5]  # the frozen threshold survives too
    (restored,) = env.entries("restore")
    assert "step 2" in restored["data"]["reason"]
    env.run_until({Phase.PROMOTED})
    assert env.traffic.weights == [50, 100]
    assert verify(env.audit.path).ok


def test_rolled_back_stays_rolled_back_after_a_restart(tmp_path: Path) -> None:
    env = Env(tmp_path, Traffic(candidate_error_rate=0.3), Clock(), make_rollout())
    env.run_until({Phase.ROLLED_BACK})
    env.restart(make_rollout(), Traffic())  # the candidate now looks healthy
    assert env.controller.state.phase is Phase.ROLLED_BACK
    assert env.traffic.weights == [0]
    for _ in range(20):
        env.traffic.serve()
        env.clock.now += TICK
        env.controller.tick()
    assert env.controller.state.phase is Phase.ROLLED_BACK and env.traffic.weights == [0]
    env.audit.close()


def test_approval_waits_and_records_the_approver(tmp_path: Path) -> None:
    env = Env(tmp_path, Traffic(), Clock(), make_rollout(require_approval=True))
    actions = env.run_until({Phase.AWAITING_APPROVAL})
    assert actions[-1] is Action.AWAIT_APPROVAL and env.traffic.weights == [10, 50]
    for _ in range(5):  # time and traffic alone do not move it
        env.traffic.serve()
        env.clock.now += TICK
        assert env.controller.tick().action is Action.NONE
    assert env.traffic.weights == [10, 50]
    decision = env.controller.action("approve", "alice")
    assert decision.action is Action.APPROVE and env.traffic.weights == [10, 50, 100]
    (admin,) = env.entries("admin")
    assert admin["actor"] == "alice" and admin["data"]["state"]["approved_by"] == "alice"
    saved = env.store.load("fraud")
    assert saved is not None and saved["approved_by"] == "alice"
    env.run_until({Phase.PROMOTED})
    assert env.traffic.weights == [10, 50, 100]
    env.audit.close()


def test_a_rejected_action_changes_nothing(env: Env) -> None:
    saved, entries = env.store.load("fraud"), env.entries()
    with pytest.raises(ActionRejected, match="not awaiting approval"):
        env.controller.action("approve", "mallory")
    with pytest.raises(ActionRejected, match="not paused"):
        env.controller.action("resume", "mallory")
    assert env.store.load("fraud") == saved and env.entries() == entries
    assert env.traffic.weights == [10]


def test_pause_resume_and_rollback_by_an_operator(env: Env) -> None:
    env.controller.action("pause", "ops")
    for _ in range(10):
        env.traffic.serve()
        env.clock.now += TICK
        env.controller.tick()
    assert env.controller.state.phase is Phase.PAUSED and env.traffic.weights == [10]
    env.controller.action("resume", "ops")
    env.controller.action("rollback", "ops")
    assert env.traffic.weights == [10, 0] and env.saved_phase() == "rolled_back"
    assert [(e["data"]["action"], e["actor"]) for e in env.entries("admin")] == [
        ("pause", "ops"),
        ("resume", "ops"),
        ("rollback", "ops"),
    ]


def test_decisions_are_persisted_before_they_are_applied(tmp_path: Path) -> None:
    seen: list[tuple[float, str | None]] = []
    env = Env(tmp_path, Traffic(), Clock(), make_rollout())

    def apply_weight(weight: float) -> None:  # what the state directory says at that moment
        saved = env.store.load("fraud")
        seen.append((weight, saved["phase"] if saved else None))
        env.traffic.apply_weight(weight)

    env.controller = RolloutController(
        make_rollout(),
        store=env.store,
        audit=env.audit,
        evidence=env.traffic.evidence,
        apply_weight=apply_weight,
        set_latency_threshold=env.traffic.set_latency_threshold,
        reset_windows=env.traffic.reset_windows,
        clock=env.clock,
    )
    env.traffic.candidate_error_rate = 0.3
    env.run_until({Phase.ROLLED_BACK})
    assert seen == [(10, "progressing"), (0, "rolled_back")]
    env.audit.close()


def test_a_failed_save_applies_nothing(tmp_path: Path) -> None:
    failing = {"on": False}

    def fsync(fd: int) -> None:
        if failing["on"]:
            raise OSError("disk full")

    env = Env(tmp_path, Traffic(candidate_error_rate=0.3), Clock(), make_rollout())
    env.store = StateStore(tmp_path / "state", fsync=fsync)
    env.controller = env.start(make_rollout())
    env.run_until({Phase.PROGRESSING}, max_ticks=1)  # freezes the latency threshold
    failing["on"] = True
    with pytest.raises(StateError, match="disk full"):
        env.run_until({Phase.ROLLED_BACK})
    assert env.controller.state.phase is Phase.PROGRESSING and env.traffic.weights[-1] == 10
    assert env.saved_phase() == "progressing" and env.entries("decision") == []
    failing["on"] = False  # the disk recovers: the next tick decides again
    env.run_until({Phase.ROLLED_BACK})
    assert env.traffic.weights[-1] == 0 and env.saved_phase() == "rolled_back"
    env.audit.close()


def test_a_thresholds_only_edit_keeps_the_state(env: Env) -> None:
    env.run_to_step(1)
    before = env.controller.state
    edited = make_rollout(
        checks=[
            {"metric": "error_rate", "max": 0.02, "on_fail": "rollback"},
            {"metric": "latency_p99", "max": 0.5, "on_fail": "rollback"},
        ]
    )
    env.controller.update_policy(edited)
    after = env.controller.state
    assert (after.generation, after.step, after.phase) == (before.generation, 1, before.phase)
    assert after.latency_threshold == 0.5  # the latency check did not change
    assert env.traffic.resets == 0 and env.traffic.weights == [10, 50]
    assert [e["kind"] for e in env.entries()][-1] == "policy"
    # A changed latency bound unfreezes the threshold; the next tick freezes the new one.
    env.controller.update_policy(
        make_rollout(checks=[{"metric": "latency_p99", "max": 0.25, "on_fail": "rollback"}])
    )
    assert env.controller.state.latency_threshold is None and env.traffic.thresholds[-1] is None
    env.run_until({Phase.PROGRESSING}, max_ticks=1)
    assert env.controller.state.latency_threshold == 0.25 and env.traffic.thresholds[-1] == 0.25


def test_a_new_candidate_starts_a_new_rollout(env: Env) -> None:
    env.run_to_step(1)
    env.controller.update_policy(make_rollout(candidate="1.2.0"))
    state = env.controller.state
    assert (state.generation, state.candidate, state.step, state.weight) == (2, "1.2.0", 0, 10)
    assert state.latency_threshold is None and env.traffic.thresholds[-1] is None
    assert env.traffic.resets == 1 and env.traffic.weights == [10, 50, 10]
    assert env.entries("start")[-1]["data"]["state"]["generation"] == 2
    # After a restart with the new policy the new generation resumes, not the old one.
    env.restart(make_rollout(candidate="1.2.0"))
    assert env.controller.state.generation == 2 and env.entries("restore")


def test_a_changed_policy_found_at_start_up_is_a_new_generation(env: Env) -> None:
    env.controller.action("rollback", "ops")
    env.restart(make_rollout(candidate="1.2.0"))
    state = env.controller.state
    assert (state.generation, state.phase, state.candidate) == (2, Phase.PROGRESSING, "1.2.0")
    assert env.traffic.weights[-1] == 10
    assert [e["kind"] for e in env.entries()][-1] == "start"


def test_a_ratio_threshold_is_frozen_from_stables_window(env: Env) -> None:
    rollout = make_rollout(
        checks=[{"metric": "latency_p99", "max_ratio_to_stable": 1.5, "on_fail": "rollback"}]
    )
    env.restart(rollout)  # same rollout: thresholds-only differences keep the state
    env.run_until({Phase.PROGRESSING}, max_ticks=1)
    expected = 1.5 * float(np.percentile(env.traffic.stable_latencies, 99))
    assert env.controller.state.latency_threshold == pytest.approx(expected)
    assert env.traffic.thresholds[-1] == pytest.approx(expected)


def test_a_step_weight_edited_while_down_applies_on_restart(env: Env) -> None:
    env.run_to_step(1)
    edited = make_rollout(steps=[{"weight": 10, "hold": "60s"}, {"weight": 30}, {"weight": 100}])
    env.restart(edited, Traffic())
    assert env.controller.state.step == 1 and env.controller.state.weight == 30
    assert env.traffic.weights == [30]
    saved = env.store.load("fraud")
    assert saved is not None and saved["weight"] == 30
