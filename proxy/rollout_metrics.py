"""Per-rollout gauges: split, phase, availability, and each check's verdict and statistics.

Every series here is about one rollout as it is now. When the rollout's split names
other versions (a new candidate), or its checks change, or the rollout is removed, the
series that described what it was are removed, not left at their last value: an old
candidate's weight must not read 1.0 beside the new one's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Gauge

from rollguard.policy.state import Phase, RolloutState
from rollguard.policy.verdict import Verdict

# The numbers of a check result (policy/verdict.py CheckResult.to_json and its detail)
# that are exported, each as a `statistic` label: a fixed set, so cardinality is bounded.
STATISTICS = ("value", "bound", "ci_lower", "ci_upper", "pvalue", "alpha")
# Why a check is inconclusive, as a few fixed words (the full reason is in /admin).
REASONS = (
    "too_few_samples",
    "no_split",
    "reference_mismatch",
    "not_frozen",
    "label_rates_differ",
    "undecided",
)


def inconclusive_reason(text: str) -> str:
    """The REASONS word for a check's `detail.reason` text (policy/checks.py)."""
    if text.startswith("too few samples"):
        return "too_few_samples"
    if "no split" in text:
        return "no_split"
    if "does not match" in text:
        return "reference_mismatch"
    if "not frozen" in text:
        return "not_frozen"
    if text.startswith("held: labels reach"):  # policy/checks.py, accuracy
        return "label_rates_differ"
    return "undecided"


CheckLabels = tuple[str, str, str]  # rollout, check index, metric


class RolloutGauges:
    """The per-rollout families, and which label sets each rollout has now."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.weight = Gauge(
            "rollguard_candidate_weight_ratio",
            "Share of traffic routed to the candidate, 0 to 1.",
            ["model", "rollout", "stable", "candidate"],
            registry=r,
        )
        self.phase = Gauge(
            "rollguard_rollout_phase",
            "1 for the rollout's current phase.",
            ["rollout", "phase"],
            registry=r,
        )
        self.unavailable = Gauge(
            "rollguard_rollout_candidate_unavailable",
            "1 while a rollout's candidate cannot take traffic (failing over, or waiting).",
            ["rollout"],
            registry=r,
        )
        self.inconclusive = Gauge(
            "rollguard_rollout_inconclusive",
            "1 once a rollout's deadline (or a step's) passed undecided.",
            ["rollout"],
            registry=r,
        )
        self.verdict = Gauge(
            "rollguard_check_verdict",
            "1 for each check's verdict at the rollout's last tick (pass, fail, inconclusive).",
            ["rollout", "check", "metric", "verdict"],
            registry=r,
        )
        self.statistic = Gauge(
            "rollguard_check_statistic",
            "A check's numbers at the last tick: value (the candidate's), bound (its limit), "
            "ci_lower and ci_upper (the always-valid interval), pvalue, alpha.",
            ["rollout", "check", "metric", "statistic"],
            registry=r,
        )
        self.reason = Gauge(
            "rollguard_check_inconclusive_reason",
            "1 for why an inconclusive check is not decided: " + ", ".join(REASONS) + ".",
            ["rollout", "check", "metric", "reason"],
            registry=r,
        )
        self._split: dict[str, tuple[str, str, str, str]] = {}
        self._checks: dict[str, dict[CheckLabels, tuple[list[str], str | None]]] = {}

    def publish(
        self, model: str, stable: str, candidate: str, weight: float, state: RolloutState
    ) -> None:
        """The rollout's split (`weight` in percent) and state; a changed split's old
        weight series and the old candidate's check series are removed."""
        name = state.name
        labels = (model, name, stable, candidate)
        old = self._split.get(name)
        if old is not None and old != labels:
            self.weight.remove(*old)
            if old[3] != candidate:
                self._drop_checks(name)
        self._split[name] = labels
        self.weight.labels(*labels).set(weight / 100.0)
        for each in Phase:
            self.phase.labels(name, each.value).set(1 if each is state.phase else 0)
        self.unavailable.labels(name).set(0 if state.unavailable is None else 1)
        self.inconclusive.labels(name).set(0 if state.inconclusive is None else 1)

    def checks(self, rollout: str, results: Sequence[Mapping[str, object]]) -> None:
        """Each check result (CheckResult.to_json, in the policy's order) of a tick; checks
        no longer in the policy lose their series. No results (a tick that evaluated none)
        leaves the last ones."""
        if not results:
            return
        now: dict[CheckLabels, tuple[list[str], str | None]] = {}
        for index, result in enumerate(results):
            labels = (rollout, str(index), str(result.get("metric", "")))
            verdict = str(result.get("verdict", ""))
            for each in Verdict:
                self.verdict.labels(*labels, each.value).set(1 if each.value == verdict else 0)
            detail = result.get("detail")
            numbers = {k: result.get(k) for k in ("value", "bound")}
            if isinstance(detail, Mapping):
                numbers |= {k: detail.get(k) for k in STATISTICS[2:]}
            exported = []
            for key, number in numbers.items():
                if isinstance(number, int | float) and not isinstance(number, bool):
                    self.statistic.labels(*labels, key).set(float(number))
                    exported.append(key)
            why = None
            if verdict == Verdict.INCONCLUSIVE.value and isinstance(detail, Mapping):
                why = inconclusive_reason(str(detail.get("reason", "")))
            for word in REASONS:
                if why is not None:
                    self.reason.labels(*labels, word).set(1 if word == why else 0)
            now[labels] = (exported, why)
        previous = self._checks.get(rollout, {})
        for labels, (exported, why) in previous.items():
            self._remove_check(labels, exported, why, keep=now.get(labels))
        self._checks[rollout] = now

    def forget(self, rollout: str) -> None:
        """A removed rollout: none of its series stay."""
        old = self._split.pop(rollout, None)
        if old is not None:
            self.weight.remove(*old)
        for each in Phase:
            _remove(self.phase, rollout, each.value)
        _remove(self.unavailable, rollout)
        _remove(self.inconclusive, rollout)
        self._drop_checks(rollout)

    def _drop_checks(self, rollout: str) -> None:
        for labels, (exported, why) in self._checks.pop(rollout, {}).items():
            self._remove_check(labels, exported, why, keep=None)

    def _remove_check(
        self,
        labels: CheckLabels,
        exported: list[str],
        why: str | None,
        keep: tuple[list[str], str | None] | None,
    ) -> None:
        """Remove a check's series that `keep` (its series now, if it still exists) lacks."""
        if keep is None:
            for each in Verdict:
                _remove(self.verdict, *labels, each.value)
        for key in exported:
            if keep is None or key not in keep[0]:
                _remove(self.statistic, *labels, key)
        if why is not None and (keep is None or keep[1] is None):
            for word in REASONS:
                _remove(self.reason, *labels, word)


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set
        gauge.remove(*labels)
