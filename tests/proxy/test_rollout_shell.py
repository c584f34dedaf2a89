"""The rollout shell (proxy/rollouts.py) over real windows, router, metrics and files, no HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from rollguard.policy.audit import read_entries, verify
from rollguard.policy.errors import StateError
from rollguard.policy.store import StateStore
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.rollouts import Rollouts
from rollguard.proxy.routing import Router, SplitTable
from rollguard.proxy.settings import Settings
from rollguard.proxy.windows import Outcome, Windows
from rollguard.serving.registry import Registry
from tests.proxy.conftest import MakeRegistry

POLICY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: fraud}}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "{candidate}"
  key: header:x-user-id
  interval: 1h
  steps:
    - {{weight: 10, hold: 0s, min_requests: 50}}
    - {{weight: {middle}, hold: 0s, min_requests: 50}}
    - {{weight: 100, hold: 0s, min_requests: 50}}
"""


@dataclass(frozen=True)
class DataPlane:
    """The four real components the shell reaches, without the HTTP data plane around them."""

    windows: Windows
    router: Router
    metrics: Metrics
    registry: Registry


class Shell:
    """A Rollouts over a tmp policies directory and state directory, and a registry of the
    versions its policies name (a rollout waits for a candidate the registry lacks)."""

    def __init__(self, root: Path, registry: Path) -> None:
        self.root = root
        self.policy = root / "policies" / "fraud.yaml"
        self.policy.parent.mkdir(parents=True, exist_ok=True)
        self.settings = Settings(
            policies=root / "policies", state=root / "state", registry=registry
        )
        self.executor = ThreadPoolExecutor(1)  # the registry's
        self.plane: DataPlane
        self.rollouts: Rollouts

    async def start(self) -> Rollouts:
        """A new process: fresh data plane, the same files."""
        self.plane = DataPlane(
            windows=Windows(self.settings.window, self.settings.agreement_tolerance),
            router=Router(),
            metrics=Metrics(CollectorRegistry()),
            registry=Registry(
                self.settings.registry,
                threads=1,
                poll_interval=self.settings.registry_poll_s,
                inline_below_us=self.settings.inline_below_us,
                timeout_s=self.settings.request_timeout_s,
            ),
        )
        await self.plane.registry.start()
        self.rollouts = Rollouts(self.plane, self.settings)
        await self.rollouts.start()
        return self.rollouts

    def write(self, candidate: str = "1.1.0", middle: int = 50) -> None:
        self.policy.write_text(POLICY.format(candidate=candidate, middle=middle))

    def table(self) -> SplitTable | None:
        return self.plane.router.table("fraud")

    def serve_candidate(self, n: int = 50) -> None:
        spec_candidate = self.rollouts.describe("fraud")["candidate"]
        window = self.plane.windows.get("fraud", spec_candidate)
        for _ in range(n):
            window.record(0.01, Outcome.OK)

    def kinds(self) -> list[str]:
        return [e["kind"] for e in read_entries(self.rollouts.audit_path)]

    def gauge(self, name: str, **labels: str) -> float | None:
        return self.plane.metrics.registry.get_sample_value(name, labels)

    async def stop(self) -> None:
        await self.rollouts.stop()
        await self.plane.registry.stop()


@pytest.fixture
async def shell(tmp_path: Path, make_registry: MakeRegistry) -> AsyncIterator[Shell]:
    shell = Shell(tmp_path, make_registry("fraud/1.0.0", "fraud/1.1.0", "fraud/1.2.0"))
    shell.write()
    await shell.start()
    yield shell
    await shell.stop()
    shell.executor.shutdown()


async def test_the_table_is_published_once_per_change(shell: Shell) -> None:
    first = shell.table()
    assert first is not None and (first.candidate, first.weight) == ("1.1.0", 10)
    for _ in range(3):  # no candidate traffic: nothing changes, nothing is published
        assert shell.rollouts.tick("fraud")["action"] == "none"
        assert shell.table() is first
    shell.serve_candidate()
    assert shell.rollouts.tick("fraud")["action"] == "advance"
    second = shell.table()
    assert second is not first and second is not None and second.weight == 50
    assert shell.gauge(
        "rollguard_candidate_weight_ratio",
        model="fraud",
        rollout="fraud",
        stable="1.0.0",
        candidate="1.1.0",
    ) == pytest.approx(0.5)
    shell.rollouts.tick("fraud")
    assert shell.table() is second
    # A pause changes the phase, not the split: the gauge moves, the table stays.
    await shell.rollouts.act("fraud", "pause", "ops", "looking")
    assert shell.table() is second
    assert shell.gauge("rollguard_rollout_phase", rollout="fraud", phase="paused") == 1
    assert shell.gauge("rollguard_rollout_phase", rollout="fraud", phase="progressing") == 0
    assert shell.kinds() == ["policy_applied", "start", "decision", "admin"]


async def test_an_edit_publishes_only_what_it_changes(shell: Shell) -> None:
    first = shell.table()
    shell.write(middle=50)  # the same file again: no event at all
    shell.rollouts.reload()
    assert shell.table() is first
    shell.serve_candidate()
    shell.rollouts.tick("fraud")
    second = shell.table()
    shell.write(middle=30)  # the current step's weight edited: the same rollout, a new split
    shell.rollouts.reload()
    third = shell.table()
    assert third is not second and third is not None and third.weight == 30
    assert shell.rollouts.describe("fraud")["step"] == 1
    assert shell.kinds()[-2:] == ["policy_applied", "policy"]


async def test_a_new_candidate_restarts_the_counts(shell: Shell) -> None:
    shell.serve_candidate()
    shell.rollouts.tick("fraud")
    stable = shell.plane.windows.get("fraud", "1.0.0")
    stable.record(0.01, Outcome.OK)
    assert shell.rollouts.describe("fraud")["variants"]["stable"]["requests"] == 1
    shell.write(candidate="1.2.0")
    shell.rollouts.reload()
    described = shell.rollouts.describe("fraud")
    assert (described["generation"], described["step"], described["candidate"]) == (2, 0, "1.2.0")
    table = shell.table()
    assert table is not None and (table.candidate, table.weight) == ("1.2.0", 10)
    assert described["variants"]["stable"]["requests"] == 0


async def test_a_removal_publishes_stable(shell: Shell) -> None:
    shell.serve_candidate()
    shell.rollouts.tick("fraud")
    shell.policy.unlink()
    shell.rollouts.reload()
    assert shell.table() == SplitTable.single("fraud", "1.0.0")
    assert shell.rollouts.overview()["rollouts"] == []
    assert shell.kinds()[-1] == "policy_removed"


async def test_a_restart_restores_the_step(shell: Shell) -> None:
    shell.serve_candidate()
    shell.rollouts.tick("fraud")
    await shell.stop()
    await shell.start()
    assert shell.rollouts.describe("fraud")["step"] == 1
    table = shell.table()
    assert table is not None and table.weight == 50
    assert shell.kinds()[-2:] == ["policy_applied", "restore"]
    assert verify(shell.rollouts.audit_path).ok


async def test_a_failed_save_applies_nothing(shell: Shell) -> None:
    failing = {"on": True}

    def fsync(fd: int) -> None:
        if failing["on"]:
            raise OSError("disk full")

    shell.rollouts.store = StateStore(shell.settings.state / "rollouts", fsync=fsync)
    first = shell.table()
    shell.serve_candidate()
    with pytest.raises(StateError, match="disk full"):
        shell.rollouts.tick("fraud")
    assert shell.table() is first and shell.rollouts.describe("fraud")["step"] == 0
    assert "decision" not in shell.kinds()
    failing["on"] = False  # the disk recovers: the next tick decides again
    assert shell.rollouts.tick("fraud")["action"] == "advance"
    table = shell.table()
    assert table is not first and table is not None and table.weight == 50


async def test_a_missing_candidate_waits_fails_over_and_begins(
    tmp_path: Path, make_registry: MakeRegistry, demo_registry: Path
) -> None:
    registry = make_registry("fraud/1.0.0")
    shell = Shell(tmp_path, registry)
    shell.write(candidate="1.1.0")
    await shell.start()
    try:
        table = shell.table()
        assert table is not None and (table.weight, table.failover) == (0, "missing")
        assert shell.rollouts.describe("fraud")["phase"] == "waiting"
        assert shell.gauge("rollguard_rollout_phase", rollout="fraud", phase="waiting") == 1
        assert shell.gauge("rollguard_rollout_candidate_unavailable", rollout="fraud") == 1
        (registry / "fraud" / "1.1.0").symlink_to(demo_registry / "fraud" / "1.1.0")
        await shell.plane.registry.refresh()
        shell.rollouts.observe("fraud")
        table = shell.table()
        assert table is not None and (table.weight, table.failover) == (10, None)
        assert shell.rollouts.describe("fraud")["phase"] == "progressing"
        assert shell.gauge("rollguard_rollout_candidate_unavailable", rollout="fraud") == 0
        # The candidate's directory goes: its share fails over at the next look.
        (registry / "fraud" / "1.1.0").unlink()
        await shell.plane.registry.refresh()
        shell.rollouts.observe("fraud")
        table = shell.table()
        assert table is not None and (table.weight, table.failover) == (10, "missing")
        assert shell.gauge("rollguard_rollout_candidate_unavailable", rollout="fraud") == 1
        assert shell.kinds()[-2:] == ["decision", "decision"]  # begin, failover
        decisions = "rollguard_rollout_decisions_total"
        assert shell.gauge(decisions, rollout="fraud", action="begin") == 1
        assert shell.gauge(decisions, rollout="fraud", action="failover") == 1
    finally:
        await shell.stop()
        shell.executor.shutdown()


async def test_a_policy_added_to_a_running_gateway_counts_no_earlier_traffic(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    """Issue 16 item 7: the stable's history before the rollout is not its evidence."""
    shell = Shell(tmp_path, make_registry("fraud/1.0.0", "fraud/1.1.0"))
    rollouts = await shell.start()  # no policy yet: the stable serves everything
    try:
        stable = shell.plane.windows.get("fraud", "1.0.0")
        for i in range(300):  # a bad morning before anyone wrote a policy
            stable.record(0.01, Outcome.MODEL_ERROR if i % 3 == 0 else Outcome.OK)
        assert stable.evidence().requests == 300
        shell.write()
        rollouts.reload()
        assert rollouts.describe("fraud")["phase"] == "progressing"
        evidence = shell.plane.windows.get("fraud", "1.0.0").evidence()
        assert (evidence.requests, evidence.errors) == (0, 0)
        stable.record(0.01, Outcome.OK)  # counted from the rollout's start on
        assert shell.plane.windows.get("fraud", "1.0.0").evidence().requests == 1
    finally:
        await shell.stop()
        shell.executor.shutdown()
