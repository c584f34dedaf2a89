"""Fleet mode's rollout shell: the decider or follower role of this process, per rollout.

proxy/rollouts.py keeps the policies, the windows and the routing table; in fleet mode
(`state: redis://`) it hands this shell what touches Redis. Per rollout one task runs:
every interval it publishes this process's window summaries (evidence.py), and while it
holds the decider lease (lease.py, campaigned for by a second task) it decides from the
fleet's merged sample: `lifecycle.observe`, then `lifecycle.tick` without carrying counts
forward (the merged summaries already hold every live process's counts), writing each
Save with compare-and-set under the lease's fence (store.py) and each Audit to the
stream, fenced too (audit.py), before the routing and windows change. Every process,
the decider included, applies the states written by others as the follower
(follow.py) reports them (`lifecycle.follow`: route, windows, frozen threshold).

When Redis does not answer (FleetUnavailable) the process keeps routing on the last
state it applied, decides nothing, and says so: a log line, `rollguard_fleet_redis_up`
0, and `status()` (in `GET /admin/rollouts`). When Redis answers again the follower
reconciles from the versions; a Redis that came back behind the version applied here
is written back by the decider (`store.restore`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from redis.exceptions import RedisError

from rollguard.policy import lifecycle
from rollguard.policy.chain import RECORD_KINDS, RECOVERED, Record
from rollguard.policy.effects import Audit, ResetWindows, Save
from rollguard.policy.errors import AuditError, PolicyError, StateError
from rollguard.policy.keys import AuditKey
from rollguard.policy.schema import Rollout
from rollguard.policy.state import RolloutState
from rollguard.policy.summary import VariantSummary, fleet_evidence
from rollguard.proxy.fleet.audit import RedisAuditLog
from rollguard.proxy.fleet.connection import RedisTarget, stop_if_cancelled
from rollguard.proxy.fleet.errors import Fenced, FleetUnavailable
from rollguard.proxy.fleet.evidence import FleetEvidence
from rollguard.proxy.fleet.follow import StateFollower
from rollguard.proxy.fleet.lease import LEASE_S, Lease, holder_id
from rollguard.proxy.fleet.store import Fence, RedisStateStore, VersionedState
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.windows import VariantWindow
from rollguard.serving.errors import ServingError

log = logging.getLogger("rollguard.fleet")
# A policy file's change reaches every process within a scan once the file is there
# (Kubernetes takes up to a minute or two to update a ConfigMap volume in every pod);
# the same change seen within this long is recorded once.
NOTE_ONCE_S = 600.0
STOP_S = 1.0  # how long a stop waits for a cancelled fleet task before freeing it


class Managed(Protocol):
    """One rollout as proxy/rollouts.py holds it."""

    rollout: Rollout
    state: RolloutState
    last: dict[str, Any] | None


class Host(Protocol):
    """What the shell needs of proxy/rollouts.py's Rollouts."""

    def managed(self, name: str) -> Managed | None: ...
    def variant_windows(self, rollout: Rollout) -> tuple[VariantWindow, VariantWindow]: ...
    def unavailable(self, rollout: Rollout) -> str | None: ...
    def reference(self, rollout: Rollout) -> np.ndarray | None: ...
    def run_local(self, name: str, rollout: Rollout, transition: lifecycle.Transition) -> None: ...
    def announce(self, rollout: Rollout, record: dict[str, Any]) -> None: ...
    def decided(self, name: str, transition: lifecycle.Transition, *, checked: bool) -> None: ...


@dataclass(eq=False)
class _Role:
    """This process's part in one rollout: its lease, its evidence, its tasks."""

    lease: Lease
    evidence: FleetEvidence
    deciding: bool = False  # a term as decider has begun (its takeover step ran)
    pending: Rollout | None = None  # a policy edit for the decider to commit
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FleetShell:
    """Redis-backed state, lease, evidence and audit for every rollout of this process."""

    def __init__(
        self,
        host: Host,
        target: RedisTarget,
        metrics: Metrics,
        *,
        key: AuditKey | None,
        lease_s: float = LEASE_S,
    ) -> None:
        self.host = host
        self.target = target
        self.metrics = metrics
        self.lease_s = lease_s
        self.process = holder_id()
        self.client = target.client(name="rollguard-" + re.sub(r"[^\w.-]", "-", self.process))
        self.store = RedisStateStore(self.client, target, key=key)
        self.audit = RedisAuditLog(self.client, target, key=key)
        self.follower = StateFollower(self.store, self._applied)
        self.latest: dict[str, VersionedState] = {}  # the newest state read or written
        self.problem: str | None = None  # this process's own last Redis failure
        self._roles: dict[str, _Role] = {}
        self._follow: asyncio.Task[None] | None = None
        metrics.fleet_redis_up.set(1)

    # -- life cycle --

    async def start(self) -> None:
        """Read every rollout's state once (so a new process routes as the fleet does from
        its first request), then follow changes. Redis down: start anyway, stable-only
        routing until it answers."""
        try:
            await self.follower.refresh()
        except FleetUnavailable as exc:
            self._down(exc)
        self._follow = asyncio.get_running_loop().create_task(self.follower.run())

    async def stop(self) -> None:
        for name in list(self._roles):
            await self.forget(name)
        if self._follow is not None:
            await self._end([self._follow])
        with contextlib.suppress(Exception):  # the connection may be gone already
            await self.client.aclose()

    async def _end(self, tasks: list[asyncio.Task[None]]) -> None:
        """Cancel `tasks` and wait for them. One stuck in a Redis read that lost its
        cancellation (see `stop_if_cancelled`) is freed by dropping the client's
        connections (the next command reconnects); one that still does not end is left
        behind with a warning, so a stop never hangs."""
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=STOP_S)
        if pending:
            with contextlib.suppress(Exception):
                await self.client.connection_pool.disconnect()
            _, pending = await asyncio.wait(pending, timeout=STOP_S)
        for task in pending:
            log.warning("fleet task %s did not stop within %gs; left behind", task.get_name(),
                        2 * STOP_S)  # fmt: skip

    def manage(self, name: str) -> None:
        """Start taking part in rollout `name` (its policy is now held by the host)."""
        if name in self._roles:
            return
        lease = Lease(self.client, self.target, name, holder=self.process, lease_s=self.lease_s)
        role = _Role(lease, FleetEvidence(self.client, self.target, name, self.process))
        self._roles[name] = role
        loop = asyncio.get_running_loop()
        role.tasks = [
            loop.create_task(lease.campaign(lambda held: self._held(name, held))),
            loop.create_task(self._loop(name, role)),
        ]

    async def forget(self, name: str) -> None:
        """Stop taking part in `name`: hand the lease on at once, withdraw the evidence."""
        role = self._roles.pop(name, None)
        if role is None:
            return
        await self._end(role.tasks)
        self.metrics.fleet_decider.labels(name).set(0)
        with contextlib.suppress(FleetUnavailable):
            await role.lease.release()
            await role.evidence.withdraw()

    async def note(
        self, kind: str, name: str | None, actor: str, data: Mapping[str, Any], content: str
    ) -> None:
        """Record what every process sees alike (a policy file applied, rejected or
        removed) once in the audit stream: the first process to append it wins, the
        others find it written (an identity kept NOTE_ONCE_S, longer than any two
        processes take to see one file change). Redis down: this process's log only."""
        identity = json.dumps([kind, name, data, content], sort_keys=True)
        try:
            await self.audit.append_once(kind, name, actor, data, once=identity, ttl_s=NOTE_ONCE_S)
        except (FleetUnavailable, AuditError) as exc:
            log.warning("rollout %s: %s not in the audit stream: %s", name, kind, exc)

    def deciding(self, name: str) -> bool:
        role = self._roles.get(name)
        return role is not None and role.lease.held

    def state_of(self, name: str) -> RolloutState | None:
        """The state of `name` last read from Redis (None: none yet, or unreadable)."""
        stored = self.latest.get(name)
        if stored is None:
            return None
        try:
            return RolloutState.from_json(stored.state)
        except (StateError, KeyError, TypeError, ValueError) as exc:
            log.error("rollout %s: state in redis not usable: %s", name, exc)
            return None

    def edited(self, name: str, rollout: Rollout) -> bool:
        """A policy edit: True when the decider will commit it (at its next step)."""
        role = self._roles.get(name)
        if role is None or not role.lease.held:
            return False
        role.pending = rollout
        return True

    # -- status --

    @property
    def available(self) -> bool:
        return self.problem is None and self.follower.available

    def status(self) -> dict[str, Any]:
        problem = self.problem or self.follower.problem
        return {
            "state": self.target.display,
            "process": self.process,
            "redis": "up" if self.available else "unavailable",
            "problem": None if self.available else problem,
            "deciding": sorted(n for n, r in self._roles.items() if r.lease.held),
            "behind": dict(self.follower.behind),
        }

    def _down(self, exc: FleetUnavailable) -> None:
        if self.problem is None:
            log.error("%s; keeping the last weights, not deciding until redis answers", exc)
        self.problem = str(exc)
        self.metrics.fleet_redis_up.set(0)

    def _up(self) -> None:
        if self.problem is not None:
            log.warning("redis at %s answers again; deciding resumes", self.target.display)
        self.problem = None
        self.metrics.fleet_redis_up.set(1 if self.follower.available else 0)

    def _held(self, name: str, held: bool) -> None:
        role = self._roles.get(name)
        if role is not None and not held:
            role.deciding = False  # a later term begins with a takeover step again
        self.metrics.fleet_decider.labels(name).set(1 if held else 0)

    # -- following --

    def _applied(self, name: str, stored: VersionedState | None) -> None:
        """The follower's callback: a state version newer than the one applied here."""
        if stored is None:
            return  # deleted in redis: keep routing as last known
        known = self.latest.get(name)
        if known is not None and known.version >= stored.version:
            return
        self.latest[name] = stored
        self._apply(name)

    def reapply(self, name: str) -> None:
        """Apply the newest state read for `name` again (its policy file changed here)."""
        self._apply(name)

    def _apply(self, name: str) -> None:
        managed, state = self.host.managed(name), self.state_of(name)
        if managed is None or state is None or state == managed.state:
            return
        if not state.same_rollout(managed.rollout):
            # This process's policy file is not (yet) the one the state was written for.
            log.info(
                "rollout %s: state v%d is for another policy; waiting", name, self.version(name)
            )
            return
        transition = lifecycle.follow(managed.rollout, managed.state, state)
        self.host.run_local(name, managed.rollout, transition)

    def version(self, name: str) -> int:
        stored = self.latest.get(name)
        return 0 if stored is None else stored.version

    # -- deciding --

    async def _loop(self, name: str, role: _Role) -> None:
        while True:
            stop_if_cancelled()
            managed = self.host.managed(name)
            await asyncio.sleep(1.0 if managed is None else managed.rollout.spec.interval)
            managed = self.host.managed(name)
            if managed is None:
                continue
            try:
                async with role.lock:
                    await self._publish(role, managed)
                    if role.lease.held:
                        await self._decide(name, role, managed)
                    elif role.pending is not None:  # lost the lease before committing it
                        self._edit_locally(managed, role.pending)
                        role.pending = None
                self._up()
            except FleetUnavailable as exc:
                self._down(exc)
            except Fenced as exc:  # another write came first: the next step re-reads
                log.warning("rollout %s: %s", name, exc)
            except (PolicyError, ServingError, OSError, RedisError) as exc:
                log.error("rollout %s: fleet step failed: %s", name, exc)

    async def _publish(self, role: _Role, managed: Managed) -> None:
        state = managed.state
        summaries = [
            VariantSummary.of(w.evidence(), generation=state.generation, weight=state.weight)
            for w in self.host.variant_windows(managed.rollout)
        ]
        await role.evidence.publish(summaries, interval_s=managed.rollout.spec.interval)

    async def _sync(self, name: str, role: _Role) -> None:
        """Decide from the newest state: read it, apply it, fence on its version; write
        back a state redis lost (it came back behind the version applied here)."""
        stored = await self.store.read(name)
        version = stored.version if stored is not None else await self.store.version(name)
        known = self.latest.get(name)
        if known is not None and version < known.version:
            log.error(
                "rollout %s: redis is behind (v%d < v%d); writing back",
                name,
                version,
                known.version,
            )
            new = await self.store.restore(name, known, fence=Fence(version, role.lease.holder))
            self._wrote(name, role, known.state, known.audit_seq, new)
            return
        role.lease.moved_to(version)
        if stored is not None:
            self._applied(name, stored)
            self.follower.known[name] = max(self.follower.known.get(name, 0), version)

    async def _decide(self, name: str, role: _Role, managed: Managed) -> None:
        await self._sync(name, role)
        now = time.time()  # wall clock: the core's times are persisted (rollouts.py)
        rollout = managed.rollout
        if not role.deciding:
            await self._take_over(name, role, managed, self.state_of(name), now)
            role.deciding = True
        if role.pending is not None:
            pending, role.pending = role.pending, None
            candidate = self.host.unavailable(pending)
            transition = lifecycle.edit(managed.rollout, managed.state, pending, now, candidate)
            await self._commit(name, role, managed, pending, transition)
            rollout = pending
        seen = lifecycle.observe(rollout, managed.state, self.host.unavailable(rollout), now)
        if seen.effects:
            await self._commit(name, role, managed, rollout, seen)
            self.host.decided(name, seen, checked=False)
        state = managed.state
        threshold = None
        if state.latency_threshold is not None:
            threshold = (float(state.latency_threshold), state.latency_rows)
        found = await role.evidence.gather()
        evidence = fleet_evidence(
            found.all(),
            stable=rollout.spec.stable,
            candidate=rollout.spec.candidate,
            generation=state.generation,
            weight=state.weight,
            threshold=threshold,
            reference=self.host.reference(rollout),
        )
        ticked = lifecycle.tick(rollout, state, evidence, now, carry=False)
        await self._commit(name, role, managed, rollout, ticked)
        self.host.decided(name, ticked, checked=True)

    async def _take_over(
        self, name: str, role: _Role, managed: Managed, saved: RolloutState | None, now: float
    ) -> None:
        """A new term as decider: begin the rollout, or continue the state in redis from
        its step (a restore; this process's windows keep counting, they are in the fleet's
        sample)."""
        rollout = managed.rollout
        saved = await self._recover(name, role, managed, saved)
        unavailable = self.host.unavailable(rollout)
        transition = lifecycle.start(rollout, saved, now, unavailable, carry=False)
        if saved is not None and saved.same_rollout(rollout):
            kept = tuple(e for e in transition.effects if not isinstance(e, ResetWindows))
            transition = lifecycle.Transition(transition.state, kept)
        log.info("rollout %s: deciding (process %s, v%d)", name, self.process, role.lease.version)
        await self._commit(name, role, managed, rollout, transition)

    async def _recover(
        self, name: str, role: _Role, managed: Managed, saved: RolloutState | None
    ) -> RolloutState | None:
        """The saved state checked against the stream, the fleet's source of truth, as
        policy/recovery.py checks a state file against the file log: a state older than
        the rollout's last record (its decider was killed between the entry and the
        save) is rebuilt from the last entry that carries one; a state naming an entry
        the stream does not hold for it (saved, then killed, by a rollguard that saved
        first) is kept. Either is recorded in a `state_recovered` entry and saved."""
        record: Record | None = None
        for entry in await self.audit.entries():
            if entry.get("rollout") == name and entry.get("kind") in RECORD_KINDS:
                record = Record.after(record, entry)
        stored = self.latest.get(name)
        seq = 0 if stored is None else stored.audit_seq
        if record is None or record.seq == seq:
            return saved
        # A threshold entry carries no state: one written before a save that never came
        # is superseded by the next tick's (the saved state has no threshold yet).
        if record.state_seq > seq and record.state is not None:
            try:
                state = RolloutState.from_json(record.state)
            except (StateError, KeyError, TypeError, ValueError) as exc:
                log.error("rollout %s: audit entry %d's state not usable: %s",
                          name, record.state_seq, exc)  # fmt: skip
                return saved
            why = (
                f"the saved state names audit entry {seq}, older than the stream's last record "
                f"of this rollout ({record.seq}): rebuilt from audit entry {record.state_seq}"
            )
        elif saved is not None and seq > record.seq:
            state = saved
            why = (
                f"the saved state names audit entry {seq}, which the stream does not hold for "
                f"this rollout (its last record is {record.seq}): saved before its entry was "
                "written; applied, and recorded now"
            )
        else:
            return saved
        log.warning("rollout %s: %s", name, why)
        data = {"reason": why, "state": state.to_json()}
        recovered = lifecycle.Transition(
            state, (Save(state), Audit(RECOVERED, lifecycle.ENGINE, data))
        )
        await self._commit(name, role, managed, managed.rollout, recovered)
        return state

    def _edit_locally(self, managed: Managed, rollout: Rollout) -> None:
        candidate = self.host.unavailable(rollout)
        transition = lifecycle.edit(managed.rollout, managed.state, rollout, time.time(), candidate)
        self.host.run_local(managed.rollout.name, rollout, transition.local())

    async def _commit(
        self,
        name: str,
        role: _Role | None,
        managed: Managed,
        rollout: Rollout,
        transition: lifecycle.Transition,
        *,
        fence: Fence | None = None,
    ) -> None:
        """Run a transition's effects as rollouts.py `_run` does, Save and Audit to redis:
        under the lease (a decider) or, for an operator's action on a follower, under
        `fence` (the version read). The first that fails stops the rest; memory holds
        a saved state once it and its Audit are written.

        Unlike the file log, the stream has other writers (other rollouts' deciders,
        operators on other processes), so the seq an entry will get is not known before
        it is appended: a decider's Save followed by its Audit appends first (the append
        is fenced by the lease as the save is) and saves the state naming the entry's real
        seq; an operator's on a follower saves first (its compare-and-set decides whether
        the action happens) and corrects the seq after the append. A decider killed
        between its two writes leaves a stream whose last record of the rollout is newer
        than the saved state; an operator's process, a state naming an entry the stream
        lacks. The next decider's takeover finds either (`_recover`). A Save followed by
        no record (bookkeeping, or a `restore`, which repeats a recorded state) names the
        rollout's last record, as the file mode's does."""
        effects = transition.effects
        recorded: RolloutState | None = None
        ahead: Audit | None = None  # the record appended ahead of the Save before it
        saved: tuple[dict[str, Any], int, int] | None = None  # data, seq, version
        for i, effect in enumerate(effects):
            if recorded is not None and not isinstance(effect, Audit):
                managed.rollout, managed.state, recorded = rollout, recorded, None
            if isinstance(effect, Save):
                write = fence if role is None else role.lease.fence()
                assert write is not None
                following = effects[i + 1] if i + 1 < len(effects) else None
                entry: dict[str, Any] | None = None
                records = isinstance(following, Audit) and following.kind in RECORD_KINDS
                if records and role is not None and isinstance(following, Audit):
                    ahead, entry = following, await self._append(role, rollout, following)
                    seq = int(entry["seq"])
                elif records:
                    # An operator on a follower: the compare-and-set on the version decides
                    # whether the action happens at all, so it comes first (an entry for an
                    # action that lost the race would be a lie); the seq is corrected below
                    # when another writer's entry took the one expected.
                    seq = (await self.audit.head())[0] + 1
                else:
                    known = self.latest.get(name)
                    seq = known.audit_seq if known is not None else 0
                data = effect.state.to_json()
                version = await self.store.save(name, data, audit_seq=seq, fence=write)
                self._wrote(name, role, data, seq, version)
                saved = (data, seq, version) if records and role is None else None
                recorded = effect.state
                if ahead is not None and ahead.announce and entry is not None:
                    self.host.announce(rollout, entry)  # once its state is saved too
            elif isinstance(effect, Audit):
                if effect is ahead:
                    ahead = None
                    continue
                entry = await self._append(role, rollout, effect)
                if saved is not None and role is None and entry["seq"] != saved[1]:
                    data, seq, version = dict(saved[0]), int(entry["seq"]), saved[2]
                    with contextlib.suppress(Fenced):  # a later write names its own entry
                        version = await self.store.save(
                            name, data, audit_seq=seq, fence=Fence(version)
                        )
                        self._wrote(name, role, data, seq, version)
                saved = None
                if effect.announce:
                    self.host.announce(rollout, entry)
            else:
                self.host.run_local(name, rollout, lifecycle.Transition(managed.state, (effect,)))
        managed.rollout, managed.state = rollout, transition.state

    async def _append(self, role: _Role | None, rollout: Rollout, audit: Audit) -> dict[str, Any]:
        fence = None if role is None else role.lease.fence()
        return await self.audit.append(
            audit.kind, rollout.name, audit.actor, audit.data, fence=fence
        )

    def _wrote(
        self, name: str, role: _Role | None, data: Mapping[str, Any], seq: int, version: int
    ) -> None:
        sealed: Literal["key", "plain"] = "key" if self.store.key is not None else "plain"
        self.latest[name] = VersionedState(dict(data), seq, version, sealed)
        self.follower.known[name] = max(self.follower.known.get(name, 0), version)
        if role is not None:
            role.lease.moved_to(version)

    # -- an operator's action --

    async def act(
        self, name: str, managed: Managed, action: str, actor: str, reason: str
    ) -> lifecycle.Decided:
        """An operator's action from any process: the decider writes under its lease; a
        follower reads the newest state and writes with compare-and-set on its version
        (Fenced if another write came first: the operator retries)."""
        role = self._roles.get(name)
        lock = role.lock if role is not None else asyncio.Lock()
        async with lock:
            held = role is not None and role.lease.held
            if held and role is not None:
                await self._sync(name, role)
                fence = None
            else:
                stored = await self.store.read(name)
                version = stored.version if stored is not None else await self.store.version(name)
                if stored is not None:
                    self._applied(name, stored)
                fence = Fence(version)
            rollout = managed.rollout
            transition = lifecycle.act(rollout, managed.state, action, actor, time.time(), reason)
            await self._commit(
                name, role if held else None, managed, rollout, transition, fence=fence
            )
        return transition
