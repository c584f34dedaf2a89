"""The imperative shell around decide(): one rollout's evidence in, state, audit and weight out.

Every change is written ahead: the new state is saved to the store, then appended to
the audit log, and only then applied to the router and announced. A crash in between
leaves a saved decision that the next start applies at once; a failed save or audit
applies nothing, and the next tick decides again from the state still in memory.

Times come from `clock` (wall-clock seconds by default, not monotonic): step start
times and approvals are persisted and must mean the same after a restart.

Not thread-safe by design: the gateway calls every method from its event-loop thread
(the policy loop's tick, admin handlers, the policy watcher), so no locks are taken.
The store and the audit log fsync on that thread, but only when the state changes (a
handful of times in a rollout's life, and admin actions), never on a tick that only
waits; a tick's own cost is evaluate_checks over the windows.
None of the injected callables may block: `notify` in particular must hand its event
to a fire-and-forget sender.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from rollguard.policy.audit import AuditLog
from rollguard.policy.checks import evaluate_checks, latency_threshold
from rollguard.policy.decide import Action, Counts, Decision, apply_action, decide
from rollguard.policy.evidence import Evidence
from rollguard.policy.schema import Check, Rollout
from rollguard.policy.state import RolloutState, mirroring, routing_weight
from rollguard.policy.store import StateStore

ENGINE = "engine"  # the audit actor for automatic decisions


class RolloutController:
    """Runs one rollout: restores its state, ticks its checks, applies decisions and actions."""

    def __init__(
        self,
        rollout: Rollout,
        *,
        store: StateStore,
        audit: AuditLog,
        evidence: Callable[[], Evidence],
        apply_weight: Callable[[float], None],
        set_latency_threshold: Callable[[float | None], None],
        reset_windows: Callable[[], None],
        notify: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rollout = rollout
        self._store = store
        self._audit = audit
        self._evidence = evidence
        self._apply_weight = apply_weight
        self._set_latency_threshold = set_latency_threshold
        self._reset_windows = reset_windows
        self._notify = notify
        self._clock = clock
        self._weight: float | None = None  # what the router was last told
        self._state = self._restore()
        self._set_latency_threshold(self._state.latency_threshold)
        self._route(self._state)

    @property
    def name(self) -> str:
        return self._rollout.name

    @property
    def rollout(self) -> Rollout:
        return self._rollout

    @property
    def state(self) -> RolloutState:
        return self._state

    @property
    def mirroring(self) -> bool:
        """Whether the gateway should mirror requests to the candidate right now."""
        return mirroring(self._rollout, self._state)

    def tick(self) -> Decision:
        """Gather evidence, run the checks, decide; persist and apply what changed."""
        now = self._clock()
        evidence = self._evidence()
        self._freeze_threshold(evidence)
        results = evaluate_checks(self._rollout.spec, evidence)
        decision = decide(self._rollout, self._state, results, Counts.of(evidence), now)
        if decision.changed:
            self._commit(decision, "decision", ENGINE)
        else:
            self._state = decision.state  # a fresher reason for status pages, nothing to persist
        return decision

    def action(self, name: str, actor: str) -> Decision:
        """An operator's rollback / promote / pause / resume / approve; ActionRejected if unfit."""
        decision = apply_action(self._rollout, self._state, name, actor, self._clock())
        self._commit(decision, "admin", actor)
        return decision

    def update_policy(self, rollout: Rollout) -> None:
        """Hot reload: keep the state for an edit of thresholds, start anew for a new candidate."""
        if rollout.name != self.name:
            raise ValueError(f"controller of {self.name!r} cannot take rollout {rollout.name!r}")
        if rollout == self._rollout:
            return
        old = self._state
        if not old.same_rollout(rollout):
            self._start(
                rollout, RolloutState.initial(rollout, self._clock(), generation=old.generation + 1)
            )
            return
        state = _unfreeze_if_stale(old, rollout)
        state = replace(state, weight=routing_weight(rollout, state), reason="policy updated")
        self._store.save(self.name, state.to_json())
        self._audit.append(
            "policy", self.name, ENGINE, {"reason": state.reason, "state": state.to_json()}
        )
        self._rollout, self._state = rollout, state
        if state.latency_threshold != old.latency_threshold:
            self._set_latency_threshold(None)
        self._route(state)

    # -- internals --

    def _restore(self) -> RolloutState:
        saved = self._store.load(self.name)
        if saved is None:
            return self._begin(RolloutState.initial(self._rollout, self._clock()))
        state = RolloutState.from_json(saved)
        if not state.same_rollout(self._rollout):
            # The policy changed while we were down: a new candidate is a new rollout.
            initial = RolloutState.initial(
                self._rollout, self._clock(), generation=state.generation + 1
            )
            return self._begin(initial)
        reason = f"restored {state.phase.value} at step {state.step + 1}, weight {state.weight:g}"
        # The policy may have been edited while we were down (thresholds, step weights).
        fresh = _unfreeze_if_stale(state, self._rollout)
        if fresh.latency_threshold != state.latency_threshold:
            reason += "; latency check changed, threshold to be frozen again"
        fresh = replace(fresh, weight=routing_weight(self._rollout, fresh))
        if fresh != state:
            self._store.save(self.name, fresh.to_json())
        self._audit.append("restore", self.name, ENGINE, {"reason": reason, "state": saved})
        return fresh

    def _begin(self, state: RolloutState) -> RolloutState:
        self._store.save(self.name, state.to_json())
        record = self._audit.append(
            "start", self.name, ENGINE, {"reason": state.reason, "state": state.to_json()}
        )
        self._announce(record)
        return state

    def _start(self, rollout: Rollout, state: RolloutState) -> None:
        self._rollout, self._state = rollout, self._begin(state)
        # Counts are "since the rollout began": the old candidate's must not leak in.
        self._reset_windows()
        self._set_latency_threshold(None)
        self._route(state)

    def _commit(self, decision: Decision, kind: str, actor: str) -> None:
        self._store.save(self.name, decision.state.to_json())  # write-ahead
        # A changed state with no action is bookkeeping (a request baseline, a hold or
        # alert that cleared): persisted, but neither audited nor announced.
        record = None
        if decision.action is not Action.NONE:
            record = self._audit.append(kind, self.name, actor, decision.to_json())
        self._state = decision.state
        self._route(decision.state)
        if record is not None:
            self._announce(record)

    def _freeze_threshold(self, evidence: Evidence) -> None:
        """Fix the latency exceedance threshold once per rollout, from stable's window."""
        state = self._state
        check = _latency_check(self._rollout)
        if state.latency_threshold is not None or state.phase.terminal or check is None:
            return
        threshold = latency_threshold(check, evidence.stable)
        if threshold is None:
            return  # stable has too few samples yet
        state = replace(state, latency_threshold=threshold, threshold_check=_check_key(check))
        self._store.save(self.name, state.to_json())
        self._audit.append(
            "threshold",
            self.name,
            ENGINE,
            {"metric": check.metric, "threshold": threshold, "stable": evidence.stable.version},
        )
        self._state = state
        self._set_latency_threshold(threshold)

    def _route(self, state: RolloutState) -> None:
        weight = routing_weight(self._rollout, state)
        if weight != self._weight:
            self._apply_weight(weight)
            self._weight = weight

    def _announce(self, record: dict[str, Any]) -> None:
        if self._notify is not None:
            self._notify(record)


def _latency_check(rollout: Rollout) -> Check | None:
    """The check whose percentile sets the one frozen latency threshold (the first one)."""
    return next((c for c in rollout.spec.checks if c.percentile is not None), None)


def _check_key(check: Check | None) -> str | None:
    return None if check is None else check.model_dump_json()


def _unfreeze_if_stale(state: RolloutState, rollout: Rollout) -> RolloutState:
    """Drop a threshold frozen for a latency check the policy no longer has as it was."""
    if state.latency_threshold is None:
        return state
    if state.threshold_check == _check_key(_latency_check(rollout)):
        return state
    return replace(state, latency_threshold=None, threshold_check=None)
