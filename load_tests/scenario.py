"""A load scenario (YAML): models, the rollout policy, the load, and what must happen.

```yaml
name: canary-bad-candidate
models: [fraud/1.0.0, fraud/1.2.0]      # demo registry versions to serve
gateway: {max_inflight: 512}             # ROLLGUARD_* settings for the gateway process
policy: |                                # one inline Rollout document (optional)
  apiVersion: rollguard/v1 ...
target: {model: fraud, users: 5000}      # V2 infer on the model, sticky x-user-id pool
#   also: key: header:NAME | cookie:NAME | none, inputs: FILE (.jsonl/.json/.npy/.npz/.csv,
#   relative to this file), input_name: NAME; run_scenario's --model/--inputs/--key override
load: {mode: open, phases: [{rate: 200, duration: 30s}], max_inflight: 256}
feedback: {enabled: true, delay: 1s}     # post each answer's true label after a delay
expect: {phase: rolled_back, within: 30s, never_phase: [promoted]}
quick: {load: {...}, within: 25s}        # --quick: a shorter run, stopped once met
```
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from load_tests.inputs import parse_key
from load_tests.loadgen import RatePhase
from load_tests.report import NO_VARIANT
from rollguard.policy.errors import PolicyInvalid
from rollguard.policy.loader import parse_rollout
from rollguard.policy.schema import Duration, Rollout
from rollguard.policy.state import Phase


class ScenarioError(Exception):
    """A scenario file that does not parse or validate; the message names file and key."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoadPhase(_Frozen):
    rate: float = Field(gt=0, le=10_000)
    duration: Duration = Field(gt=0, le=3600)


class Load(_Frozen):
    mode: Literal["open", "closed"] = "open"
    phases: tuple[LoadPhase, ...] = ()  # open loop
    connections: int = Field(default=8, ge=1, le=1024)  # closed loop
    duration: Duration = 0.0  # closed loop
    max_inflight: int = Field(default=256, ge=1, le=4096)
    timeout: Duration = 10.0

    @property
    def rate_phases(self) -> list[RatePhase]:
        return [RatePhase(p.rate, p.duration) for p in self.phases]

    @property
    def seconds(self) -> float:
        return sum(p.duration for p in self.phases) if self.mode == "open" else self.duration


class Target(_Frozen):
    model: str
    users: int = Field(default=1000, ge=0)  # 0: no sticky key header
    user_header: str = "x-user-id"
    # The stickiness key, header:NAME or cookie:NAME (or none); overrides user_header.
    key: str | None = None
    # The user's own requests (load_tests/inputs.py formats), relative to the scenario
    # file; None: the demo's evaluation rows.
    inputs: Path | None = None
    input_name: str = "input"  # tensor name for .npy/.npz/.csv rows

    @field_validator("key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None:
            parse_key(value)  # InputsError, a ValueError: reported with the key's path
        return value


class Feedback(_Frozen):
    enabled: bool = False
    delay: Duration = 1.0
    fraction: float = Field(default=1.0, ge=0, le=1)


class Expect(_Frozen):
    phase: Phase | None = None  # the rollout reaches this phase …
    within: Duration | None = None  # … at most this long after the load starts
    never_phase: tuple[Phase, ...] = ()  # phases never observed
    variants: tuple[str, ...] | None = None  # the only versions allowed to answer
    min_status: dict[int, int] = Field(default_factory=dict)  # at least n answers of status
    retry_after: bool = False  # every 503 carries Retry-After
    max_variant_errors: int | None = None  # errors the gateway counted against variants
    holding: tuple[str, ...] = ()  # metrics the rollout holds on at the end
    gateway_alive: bool = True  # /v2/health/live answers 200 after the load


class Quick(_Frozen):
    load: Load | None = None
    within: Duration | None = None
    settle: Duration | None = None  # once the expected phase is seen, run this much longer


class Scenario(_Frozen):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = ""
    models: tuple[str, ...] = Field(min_length=1)
    gateway: dict[str, str | int | float] = Field(default_factory=dict)
    policy: str | None = None
    target: Target
    load: Load
    feedback: Feedback = Feedback()
    expect: Expect = Expect()
    quick: Quick | None = None
    settle: Duration | None = None  # full runs: stop this long after the expected phase

    @cached_property
    def rollout(self) -> Rollout | None:
        return None if self.policy is None else parse_rollout(self.policy, f"{self.name}.policy")

    def quick_version(self) -> Scenario:
        """The scenario as --quick runs it: the quick load and deadline, stopped once met."""
        quick = self.quick or Quick()
        expect = self.expect.model_copy(update={"within": quick.within or self.expect.within})
        return self.model_copy(
            update={"load": quick.load or self.load, "expect": expect, "settle": quick.settle}
        )


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file, its inline policy included."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    if not isinstance(doc, Mapping):
        raise ScenarioError(f"{path}: expected a mapping")
    try:
        scenario = Scenario.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ScenarioError(f"{path}: {key}: {err['msg']} (got {err.get('input')!r})") from None
    if scenario.target.inputs is not None and not scenario.target.inputs.is_absolute():
        inputs = path.parent / scenario.target.inputs
        scenario = scenario.model_copy(
            update={"target": scenario.target.model_copy(update={"inputs": inputs})}
        )
    if scenario.load.mode == "open" and not scenario.load.phases:
        raise ScenarioError(f"{path}: load.phases: an open-loop load needs at least one phase")
    if scenario.load.mode == "closed" and scenario.load.duration <= 0:
        raise ScenarioError(f"{path}: load.duration: a closed-loop load needs a duration")
    try:
        _ = scenario.rollout
    except PolicyInvalid as exc:
        raise ScenarioError(f"{path}: policy: {exc}") from None
    return scenario


def check_expectations(expect: Expect, report: Mapping[str, Any]) -> list[str]:
    """Every way the report falls short of the expectation, one line each; [] when met."""
    failures: list[str] = []
    rollout = report.get("rollout") or {}
    seen: dict[str, float] = rollout.get("first_seen", {})
    if expect.phase is not None:
        phase = expect.phase.value
        when = seen.get(phase)
        if when is None:
            failures.append(f"phase {phase} never reached (last: {rollout.get('phase')})")
        elif expect.within is not None and when > expect.within:
            failures.append(f"phase {phase} reached at {when:.1f}s > {expect.within:g}s")
    never = [p.value for p in expect.never_phase]
    failures += [f"phase {p} seen at {seen[p]:.1f}s" for p in never if p in seen]
    if expect.variants is not None:
        extra = sorted(set(report["variants"]) - set(expect.variants) - {NO_VARIANT})
        if extra:
            failures.append(f"versions {extra} answered; only {list(expect.variants)} may")
    statuses: Mapping[str, int] = report["statuses"]
    for status, least in expect.min_status.items():
        if statuses.get(str(status), 0) < least:
            failures.append(f"{statuses.get(str(status), 0)} answers {status}, expected ≥ {least}")
    if expect.retry_after and report["retry_after_503"] < statuses.get("503", 0):
        failures.append(f"only {report['retry_after_503']} of the 503s carried Retry-After")
    if expect.max_variant_errors is not None:
        counted = sum(v.get("errors", 0) for v in rollout.get("gateway_view", {}).values())
        if counted > expect.max_variant_errors:
            failures.append(
                f"gateway counted {counted} variant errors > {expect.max_variant_errors}"
            )
    holding = set(rollout.get("holding", ()))
    failures += [
        f"not holding on {m} (holding {sorted(holding)})"
        for m in expect.holding
        if m not in holding
    ]
    if expect.gateway_alive and not report.get("gateway_alive"):
        failures.append("the gateway did not answer /v2/health/live after the load")
    return failures
