"""The Rollout document (apiVersion rollguard/v1): typed, frozen, validated once.

The JSON Schema shipped for editors (policy/rollout.schema.json) is generated from
these models (`python -m rollguard.policy.schema > policy/rollout.schema.json`), so the two
cannot drift apart; a test checks the shipped file is current.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from rollguard.policy import webhooks
from rollguard.policy.drift import drift_unavailable

MIN_INTERVAL_S = 0.1
MAX_NAME = 100
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """'250ms', '5s', '2m', '1h' or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise ValueError("that duration is not a finite number of seconds") from None
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration (e.g. 250ms, 5s, 2m, 1h)")
    if not math.isfinite(seconds):  # YAML's .nan and .inf; NaN compares false with anything
        raise ValueError(f"{value!r} is not a duration: a finite number of seconds is")
    if seconds < 0:
        raise ValueError(f"{value!r}: durations are not negative")
    return seconds


# Durations are written "5s" in YAML: the editor schema must accept the string form too.
_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": _DURATION.pattern},
    ],
    "description": "seconds, or a number with a unit: 250ms, 5s, 2m, 1h",
}
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
# Numbers, counts and flags as YAML writes them, nothing coerced: `weight: yes` was a 1 %
# step, `min_samples: true` one sample, `require_approval: "no"` false by luck.
Number = Annotated[float, Strict()]  # an int is a number too
Count = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]
Strategy = Literal["canary", "ab", "blue_green", "shadow"]
OnFail = Literal["rollback", "hold", "alert"]
OnDeadline = Literal["rollback", "hold", "alert"]
OnUnavailable = Literal["hold", "rollback"]
PassWhen = Literal["bound", "no_fail"]
ComparisonTest = Literal["conditional", "msprt"]
_LATENCY = re.compile(r"^latency_p(\d{1,2}(?:\.\d+)?)$")
LATENCY_TAIL_ROWS = 10  # stable's window must hold this many requests above its pNN to set T
DEFAULT_DEADLINE_SLACK = 3600.0
"""A canary or blue-green rollout without a `deadline` gets one: its steps' holds plus
this (an hour), with on_deadline hold unless the policy names another action. Undecided
by then, it ends explicitly inconclusive (phase inconclusive, weight kept, webhooks told)
and waits for an operator to promote or roll back, instead of holding its first step
forever without a word (as Argo Rollouts marks a rollout Degraded after its
progressDeadlineSeconds, 10 minutes by default, without aborting it)."""


class _Frozen(BaseModel):
    # No NaN or infinity in any number: `max: .nan` would make a check that never fails,
    # and a NaN weight or bound would compare false with everything it guards.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Metadata(_Frozen):
    # At most 100 characters: the name is a file name in the state directory (with a
    # suffix), and a longer one stopped the gateway at its next start (ENAMETOOLONG).
    name: str = Field(
        min_length=1, max_length=MAX_NAME, pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$"
    )
    labels: dict[str, str] = Field(default_factory=dict)


class Step(_Frozen):
    """One canary / blue-green step: candidate weight in percent, how long, how many."""

    weight: Number = Field(ge=0, le=100)
    hold: Duration = 0.0
    min_requests: Count = Field(default=0, ge=0)
    deadline: Duration | None = None  # undecided this long after the step began: on_deadline

    @model_validator(mode="after")
    def _deadline_after_hold(self) -> Step:
        if self.deadline is not None and self.deadline <= self.hold:
            raise ValueError(
                f"step deadline {self.deadline:g}s must be longer than its hold {self.hold:g}s"
            )
        return self


class Check(_Frozen):
    """One check over the per-variant evidence.

    metric: error_rate | latency_pNN (e.g. latency_p99) | accuracy | agreement | drift | srm
    Bounds (which apply depends on the metric):
      max                  candidate's value must stay at or below (error_rate, latency in s)
      min                  candidate's value must stay at or above (accuracy, agreement)
      max_ratio_to_stable  latency: candidate pNN at most this times stable's pNN. With test
                           conditional, FAIL tests the candidate against the stable's pNN
                           itself (slower than it more often than the stable) and this
                           ratio is the tolerance PASS needs
      max_increase_vs_stable  error_rate: candidate minus stable, absolute
      max_drop_vs_stable   accuracy: stable minus candidate, absolute
      threshold            drift: PSI above which a feature has drifted (default 0.25)
    For the sequential checks (error_rate, latency_pNN, accuracy, agreement):
      fail_margin          comparisons with stable: FAIL once the harm is shown above this
                           (default 0); the practical margin above is what PASS needs.
                           Latency (conditional): FAIL once the candidate is shown slower
                           than T more than 1 + fail_margin times as often as the stable
      pass_when            bound (default): PASS once the always-valid bound of the harm is
                           within the bound; no_fail: PASS once min_samples are in and no
                           FAIL (size min_samples from the FAIL test's power, see README)
    For comparisons of errors (max_increase_vs_stable) and latency (max_ratio_to_stable):
      test                 conditional (default): which arm each key's first bad event
                           landed on, given the weight it was routed at (a request without
                           a key is its own key); exact under changing weights, rates
                           drifting in both arms and uneven users (policy/conditional.py).
                           msprt: the two-sample mixture SPRT on cumulative counts (errors),
                           the one-sample exceedance test at ratio x stable's pNN (latency),
                           as before. An error check with a fail_margin above 0 uses msprt
                           unless told otherwise (the conditional test FAILs at ratio 1).
    """

    metric: str
    max: Number | None = None
    min: Number | None = None
    max_ratio_to_stable: Number | None = Field(default=None, gt=0)
    max_increase_vs_stable: Number | None = Field(default=None, ge=0)
    max_drop_vs_stable: Number | None = Field(default=None, ge=0)
    threshold: Number | None = Field(default=None, gt=0)
    method: Literal["psi", "ks"] | None = None
    confidence: Number = Field(default=0.95, gt=0.5, lt=1)
    min_samples: Count = Field(default=200, ge=1)
    on_fail: OnFail = "rollback"
    fail_margin: Number | None = Field(default=None, ge=0)
    pass_when: PassWhen = "bound"
    test: ComparisonTest | None = None

    @property
    def percentile(self) -> float | None:
        m = _LATENCY.match(self.metric)
        return float(m.group(1)) if m else None

    @property
    def comparison_test(self) -> ComparisonTest | None:
        """The test a comparison with stable runs (None: not such a check)."""
        if self.metric == "error_rate" and self.max_increase_vs_stable is not None:
            if self.test is None and self.fail_margin:
                return "msprt"
            return self.test or "conditional"
        if self.percentile is not None and self.max_ratio_to_stable is not None:
            return self.test or "conditional"
        return None

    @model_validator(mode="after")
    def _bounds_fit_metric(self) -> Check:
        metric = self.metric
        allowed: set[str]
        if metric == "error_rate":
            allowed = {"max", "max_increase_vs_stable"}
        elif self.percentile is not None:
            if not 0 < self.percentile < 100:
                raise ValueError(f"metric {metric!r}: percentile must be in (0, 100)")
            allowed = {"max", "max_ratio_to_stable"}
        elif metric == "accuracy":
            allowed = {"min", "max_drop_vs_stable"}
        elif metric == "agreement":
            allowed = {"min"}
        elif metric == "drift":
            allowed = {"threshold"}
            if (missing := drift_unavailable()) is not None:
                raise ValueError(missing)
        elif metric == "srm":
            allowed = set()
        else:
            raise ValueError(
                f"unknown metric {metric!r}; expected error_rate, latency_pNN, accuracy, "
                "agreement, drift or srm"
            )
        given = {
            k
            for k in (
                "max",
                "min",
                "max_ratio_to_stable",
                "max_increase_vs_stable",
                "max_drop_vs_stable",
                "threshold",
            )
            if getattr(self, k) is not None
        }
        if extra := given - allowed:
            raise ValueError(
                f"metric {metric!r} does not take {sorted(extra)}; it takes {sorted(allowed)}"
            )
        if not given and metric not in ("drift", "srm"):
            raise ValueError(f"metric {metric!r} needs one of {sorted(allowed)}")
        if self.method is not None and metric != "drift":
            raise ValueError("'method' applies to the drift metric only")
        if self.test is not None and self.comparison_test is None:
            raise ValueError(
                f"metric {metric!r}: 'test' applies to error_rate with max_increase_vs_stable "
                "and latency_pNN with max_ratio_to_stable only"
            )
        if self.test == "conditional" and metric == "error_rate" and self.fail_margin:
            raise ValueError(
                f"metric {metric!r}: test 'conditional' FAILs at a rate ratio of 1, so it takes "
                f"no fail_margin ({self.fail_margin:g}); use test 'msprt' for an absolute one"
            )
        margin = self.max_increase_vs_stable
        margin = self.max_drop_vs_stable if margin is None else margin
        if self.percentile is not None and self.max_ratio_to_stable is not None:
            margin = self.max_ratio_to_stable - 1.0  # latency: excess of the exceedance ratio
            if self.fail_margin is not None and self.comparison_test == "msprt":
                raise ValueError(
                    f"metric {metric!r}: 'fail_margin' applies to test 'conditional' only"
                )
        if self.fail_margin is not None:
            if margin is None:
                raise ValueError(
                    f"metric {metric!r}: 'fail_margin' applies to max_increase_vs_stable, "
                    "max_drop_vs_stable and latency's max_ratio_to_stable only"
                )
            if self.fail_margin > margin:
                raise ValueError(
                    f"metric {metric!r}: fail_margin {self.fail_margin:g} must not exceed the "
                    f"practical margin {margin:g} (FAIL would need more harm than PASS allows)"
                )
        return self


class Webhook(_Frozen):
    """One webhook. Its host must be in the operator's `webhook_allowed_hosts` (checked
    when the loader passes that list as validation context); secrets for its headers
    come from the gateway's environment, named in `headers_from_env`, never the file."""

    webhook: str = Field(pattern=r"^https?://")
    timeout: Duration = 5.0
    retries: Count = Field(default=3, ge=0, le=10)
    headers_from_env: dict[str, str] = Field(default_factory=dict)  # header -> env variable

    @field_validator("webhook")
    @classmethod
    def _allowed_destination(cls, url: str, info: ValidationInfo) -> str:
        host, port = webhooks.destination(url)
        context = info.context if isinstance(info.context, dict) else {}
        hosts = context.get("webhook_hosts")
        if hosts is not None and not webhooks.allowed(host, port, hosts):
            listed = ", ".join(hosts) if hosts else "none"
            raise ValueError(
                f"host {host!r} (port {port}) is not in the webhook_allowed_hosts setting "
                f"(allowed: {listed}); the operator lists where webhooks may go"
            )
        return url

    @field_validator("headers_from_env")
    @classmethod
    def _header_sources(cls, headers: dict[str, str]) -> dict[str, str]:
        return webhooks.check_headers_from_env(headers)


class Spec(_Frozen):
    model: str = Field(min_length=1)
    stable: str = Field(min_length=1)
    candidate: str = Field(min_length=1)
    strategy: Strategy = "canary"
    split: Literal["hash", "random"] = "hash"
    key: str | None = Field(default=None, pattern=r"^(header|cookie):[A-Za-z0-9_.-]+$")
    steps: list[Step] = Field(default_factory=list)
    window: Count = Field(default=2000, ge=10, le=1_000_000)
    # How often the rollout is looked at. At least 100 ms: a look costs milliseconds, and a
    # policy ticking every microsecond held a core and the other models' p99 (5.9 -> 174 ms).
    interval: Annotated[Duration, Field(ge=MIN_INTERVAL_S)] = 5.0
    require_approval: Flag = False
    alpha: Number = Field(default=0.05, gt=0, lt=0.5)
    # ab: fixed split until a sample size or duration, then a verdict.
    ab_weight: Number = Field(default=50.0, gt=0, lt=100)
    sample_size: Count | None = Field(default=None, ge=10)
    duration: Duration | None = None
    primary_metric: Literal["error_rate", "accuracy", "latency"] = "error_rate"
    # blue_green: how long the old side stays warm after the flip.
    warm_hold: Duration = 300.0
    # shadow: hand over to a canary of these steps once the shadow checks pass.
    then_canary: Flag = False
    checks: list[Check] = Field(default_factory=list)
    notify: list[Webhook] = Field(default_factory=list)
    # A candidate that cannot take traffic (refused, unloaded, unready): its share fails
    # over to stable while the rollout holds, then rolls back after unavailable_deadline;
    # or rolls back at once.
    on_candidate_unavailable: OnUnavailable = "hold"
    unavailable_deadline: Duration = 300.0
    # Undecided this long after the policy was applied (waiting included): on_deadline
    # rolls back, holds the current weight (phase inconclusive), or alerts and goes on.
    deadline: Duration | None = None
    on_deadline: OnDeadline = "rollback"

    @property
    def deadline_in_force(self) -> tuple[float, OnDeadline] | None:
        """The rollout deadline (seconds after the policy was applied) and its action.

        `deadline` with `on_deadline` (rollback unless named) when the policy sets one;
        else, for a canary or blue-green rollout, the steps' holds plus
        DEFAULT_DEADLINE_SLACK with on_deadline hold unless named: such a rollout always
        ends promoted, rolled back or explicitly inconclusive. ab (sample_size or
        duration) and shadow rollouts get none: nothing moves traffic there on its own."""
        if self.deadline is not None:
            return self.deadline, self.on_deadline
        if self.strategy not in ("canary", "blue_green"):
            return None
        holds = sum(s.hold for s in self.steps)
        if self.strategy == "blue_green":
            holds = (self.steps[0].hold if self.steps else 0.0) + self.warm_hold
        named = "on_deadline" in self.model_fields_set
        return holds + DEFAULT_DEADLINE_SLACK, self.on_deadline if named else "hold"

    @model_validator(mode="after")
    def _coherent(self) -> Spec:
        if self.stable == self.candidate:
            raise ValueError(f"stable and candidate are both {self.stable!r}")
        if self.split == "hash" and self.key is None and self.strategy != "shadow":
            raise ValueError("split 'hash' needs 'key' (header:NAME or cookie:NAME)")
        if self.strategy in ("canary", "blue_green") and not self.steps:
            raise ValueError(f"strategy {self.strategy!r} needs at least one step")
        weights = [s.weight for s in self.steps]
        if weights != sorted(weights):
            raise ValueError(f"step weights must not decrease: {weights}")
        if self.strategy == "ab" and self.sample_size is None and self.duration is None:
            raise ValueError("strategy 'ab' needs 'sample_size' or 'duration'")
        if self.interval <= 0:
            raise ValueError("interval must be positive")
        for i, check in enumerate(self.checks):
            q = check.percentile
            if q is None or check.max_ratio_to_stable is None:
                continue
            # T = ratio × stable's window pNN is frozen only once the window holds ten
            # requests above its pNN (policy/checks.py latency_threshold): a smaller window
            # never freezes it, and the rollout would wait forever.
            needed = math.ceil(LATENCY_TAIL_ROWS / (1.0 - q / 100.0) - 1e-9)
            if self.window < needed:
                raise ValueError(
                    f"window {self.window} can never decide checks[{i}] ({check.metric}, "
                    f"max_ratio_to_stable): its threshold needs a window of at least "
                    f"{needed} requests ({LATENCY_TAIL_ROWS} above the p{q:g}); raise "
                    f"'window' or give the check an absolute 'max'"
                )
        if self.deadline is not None:
            holds = sum(s.hold for s in self.steps) if self.strategy == "canary" else 0.0
            if self.deadline <= holds:
                raise ValueError(
                    f"deadline {self.deadline:g}s cannot be met: the steps hold {holds:g}s"
                )
        return self


class Rollout(_Frozen):
    apiVersion: Literal["rollguard/v1"]
    kind: Literal["Rollout"]
    metadata: Metadata
    spec: Spec

    @property
    def name(self) -> str:
        return self.metadata.name


def json_schema() -> dict[str, object]:
    """The JSON Schema of a Rollout document, for editors and CI linters."""
    schema = Rollout.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "rollguard Rollout"
    return schema


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2, sort_keys=True))
