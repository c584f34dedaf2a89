"""What one check concluded: pass, fail or inconclusive, with the numbers behind it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from rollguard.policy.schema import Check


class Verdict(enum.Enum):
    PASS = "pass"  # enough data, and the value is within bounds
    FAIL = "fail"  # always-valid evidence that the bound is crossed
    INCONCLUSIVE = "inconclusive"  # too little data, or the evidence does not decide yet


@dataclass(frozen=True, slots=True)
class CheckResult:
    check: Check
    verdict: Verdict
    value: float | None = None  # the candidate's observed value (rate, seconds, PSI ...)
    bound: float | None = None  # the limit it was held against
    detail: dict[str, float | int | str | None] = field(default_factory=dict)  # evidence

    def to_json(self) -> dict[str, object]:
        return {
            "metric": self.check.metric,
            "verdict": self.verdict.value,
            "value": self.value,
            "bound": self.bound,
            "on_fail": self.check.on_fail,
            "detail": dict(self.detail),
        }
