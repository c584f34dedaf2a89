"""The gateway's policy loop: watches the policies directory and drives one controller each.

The imperative shell between the policy package (which decides from numbers) and the
gateway (router tables, windows, metrics, webhooks). Everything here runs on the event
loop thread, as the controllers require.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from rollguard.policy.audit import AuditLog, read_entries
from rollguard.policy.controller import RolloutController
from rollguard.policy.errors import PolicyError, RolloutNotFound
from rollguard.policy.evidence import Evidence
from rollguard.policy.schema import Rollout
from rollguard.policy.state import Phase
from rollguard.policy.store import StateStore
from rollguard.policy.watcher import Applied, PolicyDirectory, Rejected, Removed
from rollguard.proxy.inference import Inference
from rollguard.proxy.notify import Notifier
from rollguard.proxy.routing import KeySource, SplitTable
from rollguard.proxy.settings import Settings
from rollguard.proxy.windows import VariantWindow
from rollguard.serving.errors import ServingError

log = logging.getLogger("rollguard.rollouts")
ADMIN_ACTOR = "policy-watcher"


class _Managed:
    """One rollout's controller and the task that ticks it."""

    def __init__(self, controller: RolloutController, path: Path) -> None:
        self.controller = controller
        self.path = path
        self.task: asyncio.Task[None] | None = None
        self.last: dict[str, Any] | None = None  # the last tick's decision, for status pages


class Rollouts:
    """Every rollout the policies directory declares, ticking on its own interval."""

    def __init__(self, gateway: Inference, settings: Settings) -> None:
        self.gateway = gateway
        self.settings = settings
        self.directory = PolicyDirectory(settings.policies)
        self.store = StateStore(settings.state / "rollouts")
        self.audit_path = settings.state / "audit.jsonl"
        self.audit = AuditLog(self.audit_path)
        self.rejected: dict[str, str] = {}  # file -> error
        self._managed: dict[str, _Managed] = {}
        self._watch: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._notifier: Notifier | None = None
        self._references: dict[tuple[str, str], np.ndarray | None] = {}

    # -- life cycle --

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._notifier = Notifier(self._session)
        self.settings.state.mkdir(parents=True, exist_ok=True)
        self.reload()
        self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def stop(self) -> None:
        tasks = [m.task for m in self._managed.values() if m.task] + (
            [self._watch] if self._watch else []
        )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._notifier is not None:
            await self._notifier.close()
        if self._session is not None:
            await self._session.close()
        self.audit.close()

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.policy_poll_s)
            try:
                self.reload()
            except Exception:  # the watcher must outlive any one bad scan
                log.exception("policy scan failed")

    def reload(self) -> None:
        """Scan the policies directory once and apply what changed."""
        for event in self.directory.scan():
            if isinstance(event, Applied):
                self.rejected.pop(str(event.path), None)
                self.gateway.metrics.policy_errors.labels(str(event.path)).set(0)
                self._applied(event)
            elif isinstance(event, Rejected):
                self.rejected[str(event.path)] = event.error
                self.gateway.metrics.policy_errors.labels(str(event.path)).set(1)
                log.warning("policy rejected: %s", event.error)
                self.audit.append(
                    "policy_rejected",
                    event.name,
                    ADMIN_ACTOR,
                    {"file": str(event.path), "error": event.error},
                )
            elif isinstance(event, Removed):
                self._removed(event)
        for path in [p for p in self.rejected if not Path(p).exists()]:
            del self.rejected[path]  # a rejected file that was deleted is no longer an error
            self.gateway.metrics.policy_errors.labels(path).set(0)

    def _applied(self, event: Applied) -> None:
        managed = self._managed.get(event.name)
        self.audit.append(
            "policy_applied",
            event.name,
            ADMIN_ACTOR,
            {"file": str(event.path), "changed": list(event.changed_fields)},
        )
        if managed is not None:
            self._prepare_windows(event.rollout)
            managed.controller.update_policy(event.rollout)
            managed.path = event.path
            self._route(managed.controller)
            log.info("rollout %s updated (%s)", event.name, ", ".join(event.changed_fields))
            return
        self._prepare_windows(event.rollout)
        controller = self._controller(event.rollout)
        managed = _Managed(controller, event.path)
        self._managed[event.name] = managed
        managed.task = asyncio.get_running_loop().create_task(self._tick_loop(managed))
        log.info("rollout %s: %s", event.name, controller.state.reason)

    def _removed(self, event: Removed) -> None:
        managed = self._managed.pop(event.name, None)
        if managed is None:
            return
        if managed.task is not None:
            managed.task.cancel()
        state = managed.controller.state
        # A finished rollout leaves its outcome in place; an unfinished one falls back to stable.
        version = state.candidate if state.phase is Phase.PROMOTED else state.stable
        self.gateway.router.set_table(SplitTable.single(state.model, version))
        self.audit.append(
            "policy_removed",
            event.name,
            ADMIN_ACTOR,
            {"file": str(event.path), "phase": state.phase.value, "serving": version},
        )
        log.info("rollout %s removed; %s now serves %s", event.name, state.model, version)

    # -- one rollout --

    def _prepare_windows(self, rollout: Rollout) -> None:
        spec = rollout.spec
        width = self._input_width(rollout)
        for version in (spec.stable, spec.candidate):
            self.gateway.windows.ensure(spec.model, version, spec.window, width)

    def _input_width(self, rollout: Rollout) -> int | None:
        """Drift checks need input rows: record them when the policy has one."""
        if not any(c.metric == "drift" for c in rollout.spec.checks):
            return None
        ref = self._reference(rollout.spec.model, rollout.spec.stable)
        return None if ref is None else int(ref.shape[1])

    def _reference(self, model: str, version: str) -> np.ndarray | None:
        key = (model, version)
        if key not in self._references:
            ref = None
            try:
                loaded = self.gateway.registry.get(model, version)
                if loaded.manifest.reference:
                    data = np.load(loaded.directory / loaded.manifest.reference)
                    ref = data if isinstance(data, np.ndarray) else next(iter(data.values()))
                    ref = ref.reshape(ref.shape[0], -1).astype(np.float32)
            except (ServingError, OSError, ValueError) as exc:
                log.warning("no drift reference for %s/%s: %s", model, version, exc)
            self._references[key] = ref
        return self._references[key]

    def _controller(self, rollout: Rollout) -> RolloutController:
        name = rollout.name
        gateway = self.gateway

        def current() -> Rollout:
            # The controller's rollout once it is managed (hot edits), the first one before.
            managed = self._managed.get(name)
            return managed.controller.rollout if managed is not None else rollout

        def windows() -> tuple[VariantWindow, VariantWindow]:
            spec = current().spec
            return (
                gateway.windows.get(spec.model, spec.stable),
                gateway.windows.get(spec.model, spec.candidate),
            )

        def evidence() -> Evidence:
            current = self._managed[name].controller
            spec = current.rollout.spec
            stable, candidate = windows()
            return Evidence(
                stable=stable.evidence(),
                candidate=candidate.evidence(),
                candidate_weight=current.state.weight,
                reference=self._reference(spec.model, spec.stable),
            )

        def apply_weight(weight: float) -> None:
            # Called inside the controller before its state is readable here: route on
            # the next loop turn, from the controller's final state.
            for w in windows():
                w.reset_routed()
            asyncio.get_running_loop().call_soon(self._route_by_name, name)

        def set_threshold(seconds: float | None) -> None:
            for w in windows():
                w.set_latency_threshold(seconds)

        def reset() -> None:
            for w in windows():
                w.reset()

        def notify(record: dict[str, Any]) -> None:
            # The start of a rollout is announced while its controller is being built.
            hooks = current().spec.notify
            if self._notifier is not None and hooks:
                self._notifier.send(hooks, record)

        controller = RolloutController(
            rollout,
            store=self.store,
            audit=self.audit,
            evidence=evidence,
            apply_weight=apply_weight,
            set_latency_threshold=set_threshold,
            reset_windows=reset,
            notify=notify,
        )
        self._route(controller)
        return controller

    def _route_by_name(self, name: str) -> None:
        managed = self._managed.get(name)
        if managed is not None:
            self._route(managed.controller)

    def _route(self, controller: RolloutController) -> None:
        """Publish the router table that the controller's state calls for."""
        rollout, state = controller.rollout, controller.state
        spec = rollout.spec
        table = SplitTable(
            model=spec.model,
            stable=spec.stable,
            candidate=spec.candidate,
            weight=state.weight,
            split=spec.split,
            key_source=KeySource.parse(spec.key) if spec.key else None,
            shadows=(spec.candidate,) if controller.mirroring else (),
        )
        self.gateway.router.set_table(table)
        self.gateway.metrics.weight.labels(
            spec.model, rollout.name, spec.stable, spec.candidate
        ).set(state.weight)
        for phase in Phase:
            self.gateway.metrics.phase.labels(rollout.name, phase.value).set(
                1 if state.phase is phase else 0
            )

    async def _tick_loop(self, managed: _Managed) -> None:
        while True:
            await asyncio.sleep(managed.controller.rollout.spec.interval)
            try:
                self.tick(managed.controller.name)
            except (PolicyError, ServingError, OSError) as exc:
                log.error("rollout %s: tick failed: %s", managed.controller.name, exc)

    def tick(self, name: str) -> dict[str, Any]:
        """Run one decision for a rollout now (the loop calls this; so can tests)."""
        managed = self._get(name)
        decision = managed.controller.tick()
        managed.last = decision.to_json()
        self._route(managed.controller)
        self._refresh_gauges(managed.controller)
        if decision.changed:
            self.gateway.metrics.decisions.labels(name, decision.action.value).inc()
            log.info("rollout %s: %s", name, decision.reason)
        return managed.last

    def _refresh_gauges(self, controller: RolloutController) -> None:
        spec = controller.rollout.spec
        agreement = self.gateway.windows.get(spec.model, spec.candidate).evidence().agreement
        if agreement is not None:
            self.gateway.metrics.agreement.labels(spec.model, spec.candidate).set(agreement)

    # -- admin --

    def _get(self, name: str) -> _Managed:
        managed = self._managed.get(name)
        if managed is None:
            raise RolloutNotFound(f"no rollout named {name!r}; known: {sorted(self._managed)}")
        return managed

    def _describe(self, managed: _Managed, detail: bool) -> dict[str, Any]:
        controller = managed.controller
        state, spec = controller.state, controller.rollout.spec
        doc: dict[str, Any] = {
            "name": controller.name,
            "file": str(managed.path),
            "model": spec.model,
            "strategy": spec.strategy,
            "stable": spec.stable,
            "candidate": spec.candidate,
            "phase": state.phase.value,
            "step": state.step,
            "steps": len(spec.steps),
            "weight": state.weight,
            "generation": state.generation,
            "reason": state.reason,
            "approved_by": state.approved_by,
        }
        if detail:
            doc["state"] = state.to_json()
            doc["variants"] = {
                role: self.gateway.windows.get(spec.model, version).summary()
                for role, version in (("stable", spec.stable), ("candidate", spec.candidate))
            }
            doc["last_decision"] = managed.last
        return doc

    def overview(self) -> dict[str, Any]:
        return {
            "rollouts": [self._describe(m, False) for m in self._managed.values()],
            "rejected": [{"file": f, "error": e} for f, e in sorted(self.rejected.items())],
        }

    def describe(self, name: str) -> dict[str, Any]:
        return self._describe(self._get(name), True)

    async def act(self, name: str, action: str, actor: str, reason: str) -> dict[str, Any]:
        managed = self._get(name)
        decision = managed.controller.action(action, actor)
        self._route(managed.controller)
        self.gateway.metrics.decisions.labels(name, decision.action.value).inc()
        log.info("rollout %s: %s by %s (%s)", name, action, actor, reason or "no reason given")
        return self._describe(managed, False)

    def audit_entries(
        self, *, since: datetime | None, until: datetime | None, rollout: str | None
    ) -> list[dict[str, Any]]:
        entries = read_entries(self.audit_path, since=since, until=until)
        return [e for e in entries if rollout is None or e.get("rollout") == rollout]
