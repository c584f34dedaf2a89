"""The gateway's rollout shell: watches the policies directory and runs each rollout's effects.

The policy package decides (policy/lifecycle.py returns a new state and its effects);
this shell gathers the evidence it decides from and runs the effects it returns, each
once and in order, in `_run`: the state store, the audit log, webhooks, the windows,
and the routing table, which `_publish` alone swaps, only when it differs.

Every `failover_poll_s` it asks the registry whether each rollout's candidate can take
traffic and hands the answer to the core (`lifecycle.observe`), which begins a waiting
rollout, fails a candidate's share over to stable, or rolls back; the request path
guards the moments between a refusal and the next look (proxy/inference.py).

In fleet mode (`state: redis://`) state and audit live in Redis and one process decides
for the fleet: proxy/fleet/shell.py runs that part, this shell keeps the rest.

Everything here runs on the event-loop thread (the tick tasks, admin handlers, the
policy watcher), so no locks are taken; the state store's writer thread, which writes
the ticks' bookkeeping saves, orders its own writes (policy/store.py). A tick runs in
short parts with the loop serving requests in between (`tick_steps`), and decides from
the evidence taken in its first part. Times are wall-clock seconds, not monotonic:
step start times and approvals are persisted and must mean the same after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Generator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rollguard.policy import lifecycle
from rollguard.policy.audit import AuditLog, read_entries
from rollguard.policy.checks import evaluate_check
from rollguard.policy.decision import Action
from rollguard.policy.effects import (
    Audit,
    Effect,
    ResetWindows,
    Route,
    Save,
    SetLatencyThreshold,
)
from rollguard.policy.errors import PolicyError, RolloutNotFound
from rollguard.policy.evidence import Evidence
from rollguard.policy.keys import load_key
from rollguard.policy.recovery import recover
from rollguard.policy.schema import Rollout, Spec
from rollguard.policy.state import Phase, RolloutState
from rollguard.policy.store import StateStore
from rollguard.policy.watcher import Applied, PolicyDirectory, PolicyEvent, Rejected, Removed
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.notify import Notifier
from rollguard.proxy.references import DriftReferences
from rollguard.proxy.routing import KeySource, Router, SplitTable
from rollguard.proxy.settings import Settings
from rollguard.proxy.windows import VariantWindow, Windows
from rollguard.serving.availability import Availability
from rollguard.serving.errors import ServingError
from rollguard.serving.registry import Registry

if TYPE_CHECKING:
    import numpy as np

    from rollguard.proxy.fleet.shell import FleetShell

log = logging.getLogger("rollguard.rollouts")
ADMIN_ACTOR = "policy-watcher"
_FLUSH_S = 10.0  # how long shutdown waits for the state saves still being written


class InferenceView(Protocol):
    """All the shell reaches of the data plane (proxy/inference.py's Inference has these)."""

    @property
    def windows(self) -> Windows: ...
    @property
    def router(self) -> Router: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def registry(self) -> Registry: ...


@dataclass(eq=False)
class _Managed:
    """One rollout: its current policy and state, and the task that ticks it."""

    rollout: Rollout
    state: RolloutState
    path: Path
    task: asyncio.Task[None] | None = None
    last: dict[str, Any] | None = None  # the last tick's decision, for status pages


class Rollouts:
    """Every rollout the policies directory declares, ticking on its own interval."""

    def __init__(self, inference: InferenceView, settings: Settings) -> None:
        self.inference = inference
        self.settings = settings
        self.directory = PolicyDirectory(
            settings.policies,
            webhook_hosts=settings.webhook_allowed_hosts,
            # File mode: each file's last good content, for a start that finds it broken.
            last_good=None if settings.fleet_state is not None else settings.state / "policies",
        )
        # Fleet mode (`state: redis://`): state and audit live in Redis, through the fleet
        # shell (proxy/fleet/shell.py); the file store and log below are not opened.
        # `store`, `audit` and `audit_path` exist in file mode only.
        self.fleet: FleetShell | None = None
        key = load_key(settings.audit_key, settings.audit_key_file, settings.state)
        if settings.fleet_state is not None:
            from rollguard.proxy.fleet.connection import RedisTarget
            from rollguard.proxy.fleet.shell import FleetShell

            target = RedisTarget.parse(settings.fleet_state)
            self.fleet = FleetShell(self, target, inference.metrics, key=key)
        else:
            self.store = StateStore(settings.state / "rollouts", key=key)
            self.audit_path = settings.state / "audit.jsonl"
            # Verifies the chain: a torn tail is repaired, a break reported (or refused).
            self.audit = AuditLog(
                self.audit_path, key=key, refuse_broken=settings.audit_refuse_broken
            )
            inference.metrics.audit_chain_ok.set(1 if self.audit.chain_ok else 0)
        self.rejected: dict[str, str] = {}  # file -> error
        # The gateway's listening ports, which webhooks never reach; the gateway adds each
        # port it listens on (port 0 in the settings is only known once it listens).
        self.own_ports: set[int] = {p for p in (settings.port, settings.admin_port) if p}
        self._managed: dict[str, _Managed] = {}
        self._watch: asyncio.Task[None] | None = None
        self._looking: asyncio.Task[None] | None = None
        self._notifier: Notifier | None = None
        self.references = DriftReferences(inference.registry)
        self._tasks: set[asyncio.Task[None]] = set()  # fire-and-forget work, kept referenced

    # -- life cycle --

    async def start(self) -> None:
        hosts = self.settings.webhook_allowed_hosts
        self._notifier = Notifier(  # its HTTP client is made for the first webhook
            allowed_hosts=hosts,
            own_ports=self.own_ports,
            counter=self.inference.metrics.webhooks,
        )
        if self.fleet is not None:
            await self.fleet.start()  # the fleet's states first: routed as the fleet routes
        else:
            self.settings.state.mkdir(parents=True, exist_ok=True)
        self._apply_scan(await asyncio.to_thread(_scan, self.directory))
        self._watch = asyncio.get_running_loop().create_task(self._watch_loop())
        self._looking = asyncio.get_running_loop().create_task(self._availability_loop())

    async def stop(self) -> None:
        own = (self._watch, self._looking)
        tasks = [t for t in (*own, *(m.task for m in self._managed.values())) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._notifier is not None:
            await self._notifier.close()
        if self.fleet is not None:
            await self.fleet.stop()
        else:
            # The ticks' bookkeeping saves still waiting are written before we go.
            if not await asyncio.to_thread(self.store.close, _FLUSH_S):
                log.error("state saves still unwritten at shutdown: the last counts are lost")
            self.audit.close()

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.policy_poll_s)
            try:
                # Reading and parsing YAML happen in a thread: the event loop keeps serving.
                self._apply_scan(await asyncio.to_thread(_scan, self.directory))
            except Exception:  # the watcher must outlive any one bad scan
                log.exception("policy scan failed")

    async def _availability_loop(self) -> None:
        if self.fleet is not None:
            return  # the fleet's decider looks, each interval (proxy/fleet/shell.py)
        while True:
            await asyncio.sleep(self.settings.failover_poll_s)
            for name in list(self._managed):
                try:
                    self.observe(name)
                except (PolicyError, OSError) as exc:  # a failed save: the next look retries
                    log.error("rollout %s: failover check failed: %s", name, exc)
                except Exception:  # failover must outlive any one bad look
                    log.exception("rollout %s: failover check failed", name)

    def observe(self, name: str) -> None:
        """Hand the registry's word on a rollout's candidate to the core, and run the result."""
        managed = self._get(name)
        rollout = managed.rollout
        transition = lifecycle.observe(
            rollout, managed.state, self._unavailable(rollout.spec), _now()
        )
        if transition.effects:
            self._run(managed, rollout, transition)
            decision = transition.decision
            if decision.action is not Action.NONE:  # not a reason's bookkeeping
                self.inference.metrics.decisions.labels(name, decision.action.value).inc()
                log.warning("rollout %s: %s", name, decision.reason)

    def _unavailable(self, spec: Spec) -> str | None:
        """None when the rollout's candidate can take traffic, else why not."""
        found = self.inference.registry.availability(spec.model, spec.candidate)
        return None if found is Availability.READY else found.value

    def reload(self) -> None:
        """Scan the policies directory once and apply what changed."""
        self._apply_scan(self.directory.scan())

    def _apply_scan(self, events: list[PolicyEvent]) -> None:
        errors = self.inference.metrics.policy_errors
        for event in events:
            if isinstance(event, Applied):
                self.rejected.pop(str(event.path), None)
                errors.labels(str(event.path)).set(0)
                self._applied(event)
            elif isinstance(event, Rejected):
                self.rejected[str(event.path)] = event.error
                errors.labels(str(event.path)).set(1)
                log.warning("policy rejected: %s", event.error)
                data = {"file": str(event.path), "error": event.error}
                self._note("policy_rejected", event.name, data)
            elif isinstance(event, Removed):
                self._removed(event)
        # The directory's word on what is rejected now: an unreadable file stays rejected on
        # every scan; a deleted or fixed one is no longer an error.
        now = {str(path): error for path, error in self.directory.rejected().items()}
        for path in self.rejected.keys() - now.keys():
            errors.labels(path).set(0)
        for path in now.keys() - self.rejected.keys():
            errors.labels(path).set(1)
        self.rejected = now

    def _applied(self, event: Applied) -> None:
        rollout, managed = event.rollout, self._managed.get(event.name)
        data = {"file": str(event.path), "changed": list(event.changed_fields)}
        before = "" if event.previous is None else event.previous.model_dump_json()
        self._note("policy_applied", event.name, data, before + rollout.model_dump_json())
        self._prepare_windows(rollout.spec)
        # The model this rollout routed until now, and how far it got there.
        moved = (managed.rollout.spec.model, managed.state) if managed is not None else None
        if self.fleet is not None:
            self._fleet_applied(self.fleet, event, managed)
        elif managed is not None:
            candidate = self._unavailable(rollout.spec)
            transition = lifecycle.edit(managed.rollout, managed.state, rollout, _now(), candidate)
            self._run(managed, rollout, transition)
            managed.path = event.path
            log.info("rollout %s updated (%s)", event.name, ", ".join(event.changed_fields))
        else:
            saved = recover(event.name, self.store, self.audit).state  # checked against the log
            state = None if saved is None else RolloutState.from_json(saved)
            transition = lifecycle.start(rollout, state, _now(), self._unavailable(rollout.spec))
            managed = _Managed(rollout, transition.state, event.path)
            self._run(managed, rollout, transition)
            self._managed[event.name] = managed
            managed.task = asyncio.get_running_loop().create_task(self._tick_loop(managed))
            log.info("rollout %s: %s", event.name, managed.state.reason)
        if moved is not None and moved[0] != rollout.spec.model and not self._routes(moved[0]):
            # The rollout moved to another model: the one it leaves keeps what it had
            # reached, as when a policy is removed, and is split no more.
            left, serving = moved[0], _serving(moved[1])
            self._publish(SplitTable.single(left, serving))
            log.info("rollout %s left model %s; it now serves %s", event.name, left, serving)

    def _removed(self, event: Removed) -> None:
        managed = self._managed.pop(event.name, None)
        if managed is None:
            return
        if managed.task is not None:
            managed.task.cancel()
        if self.fleet is not None:
            self._background(self.fleet.forget(event.name))
        state = managed.state
        version = _serving(state)
        if not self._routes(state.model):  # a rollout that took the model over routes it
            self._publish(SplitTable.single(state.model, version))
        self.inference.metrics.rollouts.forget(event.name)
        data = {"file": str(event.path), "phase": state.phase.value, "serving": version}
        self._note("policy_removed", event.name, data)
        log.info("rollout %s removed; %s now serves %s", event.name, state.model, version)

    def _routes(self, model: str) -> bool:
        """Whether a rollout now in force routes `model` (one may take over a model in the
        same scan that removes, or moves away, the rollout that had it)."""
        return any(m.rollout.spec.model == model for m in self._managed.values())

    # -- running effects --

    def _run(self, managed: _Managed, rollout: Rollout, transition: lifecycle.Transition) -> None:
        """Run a transition's effects, once each and in order, for `rollout`; then hold its state.

        The first effect that raises stops the rest. Memory never runs ahead of the
        records of a decision: a Save with an Audit right after it is written before
        that entry is appended, and its state held once both are done, so after a failed
        save the next tick decides again from the last recorded state. A Save with no
        Audit after it (the tests' counts each tick, or a change no decision announces:
        a request baseline, a hold that cleared) is bookkeeping: handed to the store's
        writer thread (policy/store.py `save_later`), which never lets it land after a
        later save; its state is held at once, a failed write is retried by the next
        save, and a SIGKILL loses at most the last tick's counts, as before.
        """
        spec, windows = rollout.spec, self._windows(rollout.spec)
        recorded: RolloutState | None = None  # saved; its audit entry may still be due
        for i, effect in enumerate(transition.effects):
            if recorded is not None and not isinstance(effect, Audit):
                managed.rollout, managed.state, recorded = rollout, recorded, None
            if isinstance(effect, Save):
                kind = _next_kind(transition.effects, i)
                seq = self.audit.record_seq(rollout.name, kind)
                save = self.store.save if kind is not None else self.store.save_later
                save(rollout.name, effect.state.to_json(), audit_seq=seq)
                recorded = effect.state
            elif isinstance(effect, Audit):
                record = self.audit.append(effect.kind, rollout.name, effect.actor, effect.data)
                if effect.announce and self._notifier is not None and spec.notify:
                    self._notifier.send(spec.notify, record)
            else:
                self._local(effect, spec, windows)
        managed.rollout, managed.state = rollout, transition.state

    def _local(
        self, effect: Effect, spec: Spec, windows: tuple[VariantWindow, VariantWindow]
    ) -> None:
        """Run one effect that touches only this process: routing, windows, threshold."""
        if isinstance(effect, Route):
            self._publish(_table(spec, effect), effect.state)
        elif isinstance(effect, ResetWindows):
            for window in windows:
                window.reset()
        elif isinstance(effect, SetLatencyThreshold):
            for window in windows:
                window.set_latency_threshold(effect.seconds, effect.rows, effect.tolerance)

    def _publish(self, table: SplitTable, gauges: RolloutState | None = None) -> None:
        """The one place that publishes a routing table, swapped only when it differs.

        `gauges`: the rollout state to report beside the table's weight (a phase can
        change while the table stays the same, e.g. awaiting approval).
        """
        metrics, router = self.inference.metrics, self.inference.router
        served = router.table(table.model)
        if table != served:
            router.set_table(table)
            if table.candidate is not None and (
                served is None
                or (served.candidate, served.weight) != (table.candidate, table.weight)
            ):
                # Sample-ratio checks count routed requests since the split last changed.
                for version in (table.stable, table.candidate):
                    self.inference.windows.get(table.model, version).reset_routed()
        if gauges is not None:
            candidate = table.candidate or ""
            metrics.rollouts.publish(table.model, table.stable, candidate, table.weight, gauges)

    # -- one rollout's evidence --

    def _windows(self, spec: Spec) -> tuple[VariantWindow, VariantWindow]:
        windows = self.inference.windows
        return windows.get(spec.model, spec.stable), windows.get(spec.model, spec.candidate)

    def _prepare_windows(self, spec: Spec) -> None:
        """Size both windows for the rollout; drift checks need input rows recorded too."""
        width = self.references.input_width(spec)
        for version in (spec.stable, spec.candidate):
            self.inference.windows.ensure(spec.model, version, spec.window, width)

    async def _tick_loop(self, managed: _Managed) -> None:
        while True:
            await asyncio.sleep(managed.rollout.spec.interval)
            try:
                # A part at a time, the loop serving requests in between (`tick_steps`).
                for _ in self.tick_steps(managed.rollout.name):
                    await asyncio.sleep(0)
            except (PolicyError, ServingError, OSError) as exc:
                log.error("rollout %s: tick failed: %s", managed.rollout.name, exc)

    def tick(self, name: str) -> dict[str, Any]:
        """Run one decision for a rollout now (the loop runs it in steps; tests call this)."""
        for _ in self.tick_steps(name):
            pass
        last = self._get(name).last
        assert last is not None  # run at once: nothing else changed the state meanwhile
        return last

    def tick_steps(self, name: str) -> Generator[None, None, None]:
        """One tick, pausing (a bare `yield`) between its parts: the evidence, each check,
        the decision, its effects, the metrics. Each part is short; the tick loop lets the
        event loop serve requests at each pause, and `tick` runs them all at once.

        The decision is a function of the evidence snapshot taken in the first part (the
        windows' copies, the state and policy then, the time then). If another writer
        changed the rollout's state or policy meanwhile (an operator's action, an edit, a
        failover look), the decision is dropped unrun: the next tick decides afresh.
        """
        self.observe(name)
        managed = self._get(name)
        rollout, state, now = managed.rollout, managed.state, _now()
        spec, (stable, candidate) = rollout.spec, self._windows(rollout.spec)
        evidence = Evidence(
            stable=stable.evidence(),
            candidate=candidate.evidence(),
            candidate_weight=state.weight,
            reference=self.reference(rollout),
        )
        ticking = lifecycle.begin_tick(rollout, state, evidence)
        results = []
        for check in spec.checks:
            yield
            results.append(evaluate_check(spec, check, ticking.evidence))
        yield
        transition = ticking.decide(results, now)
        yield
        current = self._managed.get(name)
        if current is not managed or managed.rollout is not rollout or managed.state is not state:
            log.info("rollout %s: changed during a tick; the next tick decides", name)
            return
        self._run(managed, rollout, transition)
        decision = transition.decision
        managed.last = decision.to_json()
        yield
        if self._managed.get(name) is not managed:
            return  # removed meanwhile: its metrics are forgotten, not to be published again
        self.inference.metrics.rollouts.checks(name, decision.evidence)
        if (agreement := evidence.candidate.agreement) is not None:
            self.inference.metrics.agreement.labels(spec.model, spec.candidate).set(agreement)
        if decision.changed:
            self.inference.metrics.decisions.labels(name, decision.action.value).inc()
            log.info("rollout %s: %s", name, decision.reason)

    # -- admin --

    def _get(self, name: str) -> _Managed:
        managed = self._managed.get(name)
        if managed is None:
            raise RolloutNotFound(f"no rollout named {name!r}; known: {sorted(self._managed)}")
        return managed

    def _describe(self, managed: _Managed, detail: bool) -> dict[str, Any]:
        doc = lifecycle.status(managed.rollout, managed.state) | {"file": str(managed.path)}
        if detail:
            spec = managed.rollout.spec
            doc["state"] = managed.state.to_json()
            registry = self.inference.registry
            doc["variants"] = {
                role: self.inference.windows.get(spec.model, version).summary()
                | {"availability": registry.availability(spec.model, version).value}
                for role, version in (("stable", spec.stable), ("candidate", spec.candidate))
            }
            doc["last_decision"] = managed.last
        return doc

    def overview(self) -> dict[str, Any]:
        doc = {
            "rollouts": [self._describe(m, False) for m in self._managed.values()],
            "rejected": [{"file": f, "error": e} for f, e in sorted(self.rejected.items())],
            "audit": self.audit_status(),
        }
        if self.fleet is not None:
            doc["fleet"] = self.fleet.status()
        return doc

    def readiness(self) -> dict[str, Any]:
        """Fleet mode's word in a ready answer: still serving, on the last weights, while
        Redis is unavailable (nothing is decided then); no addresses or errors in it."""
        if self.fleet is None:
            return {}
        status = self.fleet.status()
        return {"fleet": {"redis": status["redis"], "deciding": status["deciding"]}}

    def audit_status(self) -> dict[str, Any]:
        """How the audit chain verified at start: chain_ok, the first problem, keyed or not."""
        if self.fleet is not None:  # a stream: `rollguard audit verify --state redis://...`
            return {"chain_ok": None, "problem": None, "keyed": self.fleet.audit.keyed}
        audit = self.audit
        return {"chain_ok": audit.chain_ok, "problem": audit.problem, "keyed": audit.keyed}

    def describe(self, name: str) -> dict[str, Any]:
        return self._describe(self._get(name), True)

    async def act(self, name: str, action: str, actor: str, reason: str) -> dict[str, Any]:
        managed = self._get(name)
        rollout = managed.rollout
        if self.fleet is not None:
            transition = await self.fleet.act(name, managed, action, actor, reason)
        else:
            transition = lifecycle.act(rollout, managed.state, action, actor, _now(), reason)
            self._run(managed, rollout, transition)
        self.inference.metrics.decisions.labels(name, transition.decision.action.value).inc()
        log.info("rollout %s: %s by %s (%s)", name, action, actor, reason or "no reason given")
        return self._describe(managed, False)

    def audit_entries(
        self, *, since: datetime | None, until: datetime | None, rollout: str | None
    ) -> list[dict[str, Any]]:
        entries = read_entries(self.audit_path, since=since, until=until)
        return [e for e in entries if rollout is None or e.get("rollout") == rollout]

    async def read_audit(
        self, *, since: datetime | None, until: datetime | None, rollout: str | None
    ) -> list[dict[str, Any]]:
        """`audit_entries`, from the fleet's stream in fleet mode."""
        if self.fleet is None:
            return self.audit_entries(since=since, until=until, rollout=rollout)
        entries = await self.fleet.audit.entries(since=since, until=until)
        return [e for e in entries if rollout is None or e.get("rollout") == rollout]

    # -- fleet mode (proxy/fleet/shell.py calls these) --

    def _note(self, kind: str, name: str | None, data: dict[str, Any], content: str = "") -> None:
        """A policy file's fate in the audit log. In fleet mode every process reads the
        same files, so the stream gets one entry per distinct event (`content`: what
        the file now holds) from whichever process sees it first (proxy/fleet/shell.py)."""
        if self.fleet is None:
            self.audit.append(kind, name, ADMIN_ACTOR, data)
        else:
            log.info("rollout %s: %s %s", name, kind, data)
            self._background(self.fleet.note(kind, name, ADMIN_ACTOR, data, content))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fleet_applied(self, fleet: FleetShell, event: Applied, managed: _Managed | None) -> None:
        """A policy file in fleet mode: follow the fleet's state for it. The decider
        commits an edit; a follower applies it here only until the decider's state comes."""
        rollout = event.rollout
        if managed is not None:
            managed.path = event.path
            if not fleet.edited(event.name, rollout):
                candidate = self._unavailable(rollout.spec)
                transition = lifecycle.edit(
                    managed.rollout, managed.state, rollout, _now(), candidate
                )
                self._run(managed, rollout, transition.local())
                fleet.reapply(event.name)  # the decider may have written it already
            return
        # Until the fleet's state for this policy is read: waiting, stable only.
        waiting = lifecycle.begin(rollout, _now(), candidate="no fleet state yet")
        managed = _Managed(rollout, waiting.state, event.path)
        self._run(managed, rollout, waiting.local())
        self._managed[event.name] = managed
        state = fleet.state_of(event.name)
        if state is not None and state.same_rollout(rollout):
            self.run_local(event.name, rollout, lifecycle.follow(rollout, managed.state, state))
        fleet.manage(event.name)
        log.info("rollout %s: fleet mode, %s", event.name, managed.state.reason)

    def managed(self, name: str) -> _Managed | None:
        return self._managed.get(name)

    def variant_windows(self, rollout: Rollout) -> tuple[VariantWindow, VariantWindow]:
        return self._windows(rollout.spec)

    def unavailable(self, rollout: Rollout) -> str | None:
        return self._unavailable(rollout.spec)

    def reference(self, rollout: Rollout) -> np.ndarray | None:
        """The stable's training-input sample the drift checks compare with, or None."""
        return self.references.get(rollout.spec.model, rollout.spec.stable)

    def run_local(self, name: str, rollout: Rollout, transition: lifecycle.Transition) -> None:
        """Run a transition with no Save or Audit in it (fleet mode records in redis)."""
        assert not any(isinstance(e, Save | Audit) for e in transition.effects)
        managed = self._managed.get(name)
        if managed is not None:
            self._run(managed, rollout, transition)

    def announce(self, rollout: Rollout, record: dict[str, Any]) -> None:
        if self._notifier is not None and rollout.spec.notify:
            self._notifier.send(rollout.spec.notify, record)

    def decided(self, name: str, transition: lifecycle.Transition, *, checked: bool) -> None:
        """Metrics and logs of a fleet decider's observe (`checked` false) or tick."""
        managed = self._managed.get(name)
        if managed is None or not isinstance(transition, lifecycle.Decided):
            return
        decision = transition.decision
        metrics = self.inference.metrics
        if checked:
            managed.last = decision.to_json()
            metrics.rollouts.checks(name, decision.evidence)
        if decision.action is not Action.NONE and (decision.changed or not checked):
            metrics.decisions.labels(name, decision.action.value).inc()
            log.warning("rollout %s: %s", name, decision.reason)


def _table(spec: Spec, route: Route) -> SplitTable:
    """The routing table a rollout's Route effect calls for."""
    return SplitTable(
        model=spec.model,
        stable=spec.stable,
        candidate=spec.candidate,
        weight=route.weight,
        split=spec.split,
        key_source=KeySource.parse(spec.key) if spec.key else None,
        # No copies to a candidate that cannot take them.
        shadows=(spec.candidate,) if route.mirroring and route.failover is None else (),
        failover=route.failover,
    )


def _serving(state: RolloutState) -> str:
    """The version a model keeps when its rollout goes (removed, or moved to another
    model): a finished rollout leaves its outcome in place, an unfinished one the stable."""
    return state.candidate if state.phase is Phase.PROMOTED else state.stable


def _next_kind(effects: tuple[Effect, ...], i: int) -> str | None:
    """The audit kind right after effect i, if an Audit follows it (a Save's record)."""
    following = effects[i + 1] if i + 1 < len(effects) else None
    return following.kind if isinstance(following, Audit) else None


def _scan(directory: PolicyDirectory) -> list[PolicyEvent]:
    """The directory's changes, read off the event loop; when a policy with a drift check
    arrives, scipy.stats (the KS test, imported lazily to keep a proxy-only gateway small)
    is imported here too, not by the first drift check on the loop (~0.5 s)."""
    events = directory.scan()
    if any(
        isinstance(event, Applied) and any(c.metric == "drift" for c in event.rollout.spec.checks)
        for event in events
    ):
        import scipy.stats  # noqa: F401

    return events


def _now() -> float:
    # Wall clock on purpose: the times the core records are persisted (see the docstring).
    return time.time()
