"""A rollout's test counts, carried across restarts as one small serialisable summary.

The sequential tests decide from counts since the rollout began. The gateway's windows
hold those counts only for the life of the process; the rollout state holds two tallies
of them:

- `seen`: what the windows of this process had counted at the last tick;
- `carried`: what earlier processes had counted (the sum of their last `seen`).

The evidence a check sees is carried + the windows' counts now, so a restart continues
each test (its e-values and confidence sequences are functions of these counts) instead
of starting it again. When the windows count less than was seen (a new process, or
counters reset under a running rollout), `seen` moves into `carried`. A latency threshold
frozen anew drops the latency counts: they were counted against another threshold.

A tally is per configured weight (policy/conditional.py strata) plus label totals; the
shared-state helper of a fleet can store it as it stands (plain numbers, `to_json`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from rollguard.policy.errors import StateError
from rollguard.policy.evidence import Evidence, StratumRow, VariantEvidence

__all__ = ["UNKNOWN_WEIGHT", "Tally", "carry_forward", "merged"]

# requests, errors, since_threshold, over_threshold, error_units, slow_units
Counts = tuple[int, int, int, int, int, int]
Row = tuple[float, Counts, Counts]  # weight, stable, candidate
# stable labelled, correct, labelled requests, over the latency tolerance; the same for
# the candidate
Labels = tuple[int, int, int, int, int, int, int, int]
# weight; stable's labelled rows and correct ones; the candidate's
LabelStratum = tuple[float, int, int, int, int]
_ZERO: Counts = (0, 0, 0, 0, 0, 0)
_NO_LABELS: Labels = (0, 0, 0, 0, 0, 0, 0, 0)
UNKNOWN_WEIGHT = -1.0
"""The stratum of counts given without their weights (evidence built by hand)."""


@dataclass(frozen=True, slots=True)
class Tally:
    """Both arms' counts per configured weight, and their label totals."""

    strata: tuple[Row, ...] = ()
    labels: Labels = _NO_LABELS
    label_strata: tuple[LabelStratum, ...] = ()  # labels per weight (accuracy)

    @classmethod
    def of(cls, evidence: Evidence) -> Tally:
        """What the windows behind `evidence` have counted."""
        s, c = evidence.stable, evidence.candidate
        rows: dict[float, tuple[Counts, Counts]] = {}
        for w, *n in _rows(s):
            rows[w] = (_counts(n), _ZERO)
        for w, *n in _rows(c):
            rows[w] = (rows.get(w, (_ZERO, _ZERO))[0], _counts(n))
        strata = tuple((w, st, ca) for w, (st, ca) in sorted(rows.items()))
        stable = (s.labelled, s.correct, s.labelled_requests, s.over_tolerance)
        labels = (*stable, c.labelled, c.correct, c.labelled_requests, c.over_tolerance)
        per_weight: dict[float, list[int]] = {}
        for i, v in ((0, s), (2, c)):
            for w, labelled, ok in v.label_strata:
                per_weight.setdefault(w, [0, 0, 0, 0])[i : i + 2] = (labelled, ok)
        label_strata = tuple((w, a, b, x, y) for w, (a, b, x, y) in sorted(per_weight.items()))
        return cls(strata, labels, label_strata)

    @property
    def empty(self) -> bool:
        return not self.strata and self.labels == _NO_LABELS and not self.label_strata

    def plus(self, other: Tally) -> Tally:
        rows = {w: (st, ca) for w, st, ca in self.strata}
        for w, st, ca in other.strata:
            mine = rows.get(w, (_ZERO, _ZERO))
            rows[w] = (_add(mine[0], st), _add(mine[1], ca))
        strata = tuple((w, st, ca) for w, (st, ca) in sorted(rows.items()))
        a, b = self.labels, other.labels
        labels = (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4],
                  a[5] + b[5], a[6] + b[6], a[7] + b[7])  # fmt: skip
        per_weight = {w: (p, q, r, t) for w, p, q, r, t in self.label_strata}
        for w, p, q, r, t in other.label_strata:
            m = per_weight.get(w, (0, 0, 0, 0))
            per_weight[w] = (m[0] + p, m[1] + q, m[2] + r, m[3] + t)
        label_strata = tuple((w, *n) for w, n in sorted(per_weight.items()))
        return Tally(strata, labels, label_strata)

    def below(self, other: Tally) -> bool:
        """True when any count here is below `other`'s: the counters restarted since."""
        mine = {w: (st, ca) for w, st, ca in self.strata}
        for w, st, ca in other.strata:
            now = mine.get(w, (_ZERO, _ZERO))
            if any(a < b for a, b in zip((*now[0], *now[1]), (*st, *ca), strict=True)):
                return True
        mine_l = {w: n for w, *n in self.label_strata}
        for w, *n in other.label_strata:
            if any(a < b for a, b in zip(mine_l.get(w, [0, 0, 0, 0]), n, strict=True)):
                return True
        return any(a < b for a, b in zip(self.labels, other.labels, strict=True))

    def without_latency(self) -> Tally:
        """The same counts with none against a latency threshold (a new one is frozen)."""
        strata = tuple((w, _no_latency(st), _no_latency(ca)) for w, st, ca in self.strata)
        n = self.labels
        return Tally(strata, (n[0], n[1], n[2], 0, n[4], n[5], n[6], 0), self.label_strata)

    def to_json(self) -> dict[str, Any]:
        return {
            "strata": [[w, list(st), list(ca)] for w, st, ca in self.strata],
            "labels": list(self.labels),
            "label_strata": [[w, *n] for w, *n in self.label_strata],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Tally:
        try:
            strata = tuple(
                (float(w), _counts(st), _counts(ca)) for w, st, ca in data.get("strata", ())
            )
            label_strata = tuple(
                _label_stratum(row) for row in data.get("label_strata", ())
            )  # absent in states saved before labels were counted per weight
            return cls(strata, _labels(data.get("labels", _NO_LABELS)), label_strata)
        except (AttributeError, TypeError, ValueError) as exc:
            raise StateError(f"test counts are malformed: {exc}") from exc


def carry_forward(
    carried: Tally | None, seen: Tally | None, now: Tally
) -> tuple[Tally | None, Tally | None]:
    """(carried, seen) after a look at the windows' counts `now` (None: nothing counted)."""
    if seen is not None and now.below(seen):
        carried = seen if carried is None else carried.plus(seen)
    return carried, None if now.empty else now


def merged(evidence: Evidence, carried: Tally | None) -> Evidence:
    """`evidence` with the counts of earlier processes added (totals and strata)."""
    if carried is None or carried.empty:
        return evidence
    labels, per_weight = carried.labels, carried.label_strata
    stable = _add_variant(evidence.stable, [(w, st) for w, st, _ in carried.strata], labels[:4])
    candidate = _add_variant(
        evidence.candidate, [(w, ca) for w, _, ca in carried.strata], labels[4:]
    )
    stable = _add_labels(stable, [(w, n, ok) for w, n, ok, _, _ in per_weight])
    candidate = _add_labels(candidate, [(w, n, ok) for w, _, _, n, ok in per_weight])
    return replace(evidence, stable=stable, candidate=candidate)


def _add_labels(v: VariantEvidence, rows: list[tuple[float, int, int]]) -> VariantEvidence:
    """`v` with earlier processes' labels per weight added to its own."""
    if not any(n for _, n, _ in rows):
        return v
    per_weight = {w: (n, ok) for w, n, ok in v.label_strata}
    for w, n, ok in rows:
        mine = per_weight.get(w, (0, 0))
        per_weight[w] = (mine[0] + n, mine[1] + ok)
    return replace(v, label_strata=tuple((w, *n) for w, n in sorted(per_weight.items())))


def _add_variant(
    v: VariantEvidence, rows: list[tuple[float, Counts]], labels: tuple[int, ...]
) -> VariantEvidence:
    strata = {w: _counts(n) for w, *n in _rows(v)}
    total = _ZERO
    for w, n in rows:
        if n == _ZERO:
            continue  # the other arm's weight: nothing counted here
        strata[w] = _add(strata.get(w, _ZERO), n)
        total = _add(total, n)
    return replace(
        v,
        requests=v.requests + total[0],
        errors=v.errors + total[1],
        since_threshold=v.since_threshold + total[2],
        over_threshold=v.over_threshold + total[3],
        labelled=v.labelled + labels[0],
        correct=v.correct + labels[1],
        labelled_requests=v.labelled_requests + labels[2],
        over_tolerance=v.over_tolerance + labels[3],
        strata=tuple((w, *n) for w, n in sorted(strata.items())),
    )


def _rows(v: VariantEvidence) -> tuple[StratumRow, ...]:
    """A variant's strata; its totals as one stratum when it has none (every event its
    own unit)."""
    if v.strata or not v.requests:
        return v.strata
    e, o = v.errors, v.over_threshold
    return ((UNKNOWN_WEIGHT, v.requests, e, v.since_threshold, o, e, o),)


def _counts(values: Any) -> Counts:
    n = [int(x) for x in values]
    if len(n) == 4:  # saved before keys' first events were counted: none carried
        n += [0, 0]
    a, b, c, d, e, f = n
    if min(a, b, c, d, e, f) < 0:
        raise ValueError(f"negative count in {values!r}")
    return a, b, c, d, e, f


def _label_stratum(values: Any) -> LabelStratum:
    w, *n = values
    a, b, c, d = (int(x) for x in n)
    if min(a, b, c, d) < 0 or b > a or d > c:
        raise ValueError(f"bad label counts in {values!r}")
    return float(w), a, b, c, d


def _labels(values: Any) -> Labels:
    """Label totals from JSON; six numbers (no latency tolerance) from earlier states."""
    n = [int(x) for x in values]
    if len(n) == 6:
        n = [*n[:3], 0, *n[3:], 0]
    a, b, c, d, e, f, g, h = n
    if min(n) < 0:
        raise ValueError(f"negative count in {values!r}")
    return a, b, c, d, e, f, g, h


def _add(a: Counts, b: Counts) -> Counts:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4], a[5] + b[5]


def _no_latency(n: Counts) -> Counts:
    return n[0], n[1], 0, 0, n[4], 0
