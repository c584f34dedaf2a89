"""A scenario's report: per-variant numbers, a 1 s timeline and decisions as JSON, and a PNG.

Latencies are from the scheduled send time (what a user of an open-loop arrival process
waits) unless named `*_from_send`. Error rate counts server errors (5xx other than 503)
per answer; 503 overload rejections, client drops and client-side failures are counted
on their own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.loadgen import CLIENT_ERROR, DROPPED, LoadResult, Record

NO_VARIANT = "(no variant)"  # answers without an x-rollguard-variant header (e.g. 503)


@dataclass(frozen=True, slots=True)
class Poll:
    """One look at the rollout through the admin port's GET /admin/rollouts; `at` on the
    load's clock."""

    at: float
    phase: str
    weight: float
    step: int


def _ms(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    q = np.percentile(np.asarray(values) * 1000.0, (50, 95, 99))
    return {
        "p50": round(float(q[0]), 2),
        "p95": round(float(q[1]), 2),
        "p99": round(float(q[2]), 2),
    }


def _is_error(status: int) -> bool:
    return status >= 500 and status != 503


def _stats(records: Sequence[Record], seconds: float) -> dict[str, Any]:
    answered = [r for r in records if r.status > 0]
    errors = sum(_is_error(r.status) for r in answered)
    return {
        "requests": len(answered),
        "ok": sum(r.status == 200 for r in answered),
        "errors": errors,
        "rejected_503": sum(r.status == 503 for r in answered),
        "error_rate": round(errors / len(answered), 5) if answered else None,
        "throughput_rps": round(len(answered) / seconds, 2) if seconds > 0 else None,
        "latency_ms": _ms([r.latency_from_schedule for r in answered]),
        "latency_from_send_ms": _ms([r.latency_from_send for r in answered]),
    }


def _by_variant(records: Iterable[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for r in records:
        if r.status > 0:
            groups.setdefault(r.variant or NO_VARIANT, []).append(r)
    return groups


def _timeline(
    records: Sequence[Record], polls: Sequence[Poll], candidate: str | None
) -> list[dict[str, Any]]:
    if not records:
        return []
    buckets: dict[int, list[Record]] = {}
    for r in records:
        buckets.setdefault(int(r.scheduled), []).append(r)
    rows = []
    for second in range(max(buckets) + 1):
        group = buckets.get(second, [])
        answered = [r for r in group if r.status > 0]
        ok = [r for r in answered if r.status == 200]
        variants = dict(sorted(_by_variant(answered).items()))
        last = [p for p in polls if p.at <= second + 1]
        row: dict[str, Any] = {
            "t": second,
            "arrivals": len(group),
            "answered": len(answered),
            "errors": sum(_is_error(r.status) for r in answered),
            "rejected_503": sum(r.status == 503 for r in answered),
            "dropped": sum(r.status == DROPPED for r in group),
            "client_errors": sum(r.status == CLIENT_ERROR for r in group),
            "p99_ms": _ms([r.latency_from_schedule for r in answered])["p99"],
            "p99_ms_by_variant": {
                v: _ms([r.latency_from_schedule for r in rs])["p99"] for v, rs in variants.items()
            },
            "error_rate_by_variant": {
                v: round(sum(_is_error(r.status) for r in rs) / len(rs), 5)
                for v, rs in variants.items()
            },
            "weight": last[-1].weight if last else None,
            "phase": last[-1].phase if last else None,
        }
        row["error_rate"] = round(row["errors"] / len(answered), 5) if answered else None
        served = sum(r.variant == candidate for r in ok)
        row["candidate_share"] = round(served / len(ok), 5) if ok and candidate else None
        rows.append(row)
    return rows


def _decisions(audit: Iterable[Mapping[str, Any]], started_wall: float) -> list[dict[str, Any]]:
    """Audit entries that carry an action, placed on the load's clock."""
    found = []
    for entry in audit:
        data = entry.get("data") or {}
        action = data.get("action")
        if not action or action == "none":
            continue
        wall = datetime.fromisoformat(str(entry["ts"])).timestamp()
        found.append(
            {
                "t": round(wall - started_wall, 3),
                "action": action,
                "kind": entry.get("kind"),
                "actor": entry.get("actor"),
                "weight": data.get("weight"),
                "reason": data.get("reason"),
            }
        )
    return found


def build_report(
    name: str,
    result: LoadResult,
    *,
    polls: Sequence[Poll],
    audit: Sequence[Mapping[str, Any]],
    detail: Mapping[str, Any] | None,
    alive: bool,
) -> dict[str, Any]:
    """Everything a reader needs about one run, as plain JSON-able values."""
    records = result.records
    answered_end = max((r.end for r in records if r.status > 0), default=0.0)
    seconds = max((r.scheduled for r in records), default=0.0) + 1.0 / max(len(records), 1)
    candidate = detail.get("candidate") if detail else None
    statuses: dict[str, int] = {}
    for r in records:
        if r.status > 0:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    first_seen: dict[str, float] = {}
    for p in polls:
        first_seen.setdefault(p.phase, round(p.at, 2))
    rollout = None
    if detail is not None:
        state = detail.get("state") or {}
        rollout = {
            key: detail.get(key)
            for key in ("name", "model", "strategy", "stable", "candidate", "phase", "weight")
        } | {
            "step": detail.get("step"),
            "reason": detail.get("reason"),
            "holding": state.get("holding", []),
            "winner": state.get("winner"),
            "first_seen": first_seen,
            "gateway_view": {v["version"]: v for v in (detail.get("variants") or {}).values() if v},
        }
    return {
        "scenario": name,
        "started_at": datetime.fromtimestamp(result.started_wall).astimezone().isoformat(),
        "load": {
            "mode": result.mode,
            "arrivals": len(records),
            "answered": sum(r.status > 0 for r in records),
            "dropped_by_client": sum(r.status == DROPPED for r in records),
            "client_errors": sum(r.status == CLIENT_ERROR for r in records),
            "duration_s": round(seconds, 2),
            "drained_at_s": round(answered_end, 2),
            "peak_inflight": result.peak_inflight,
            "feedback_sent": result.feedback_sent,
            "feedback_ok": result.feedback_ok,
        },
        "statuses": dict(sorted(statuses.items())),
        "retry_after_503": sum(r.status == 503 and r.retry_after for r in records),
        "overall": _stats(records, seconds),
        "variants": {v: _stats(rs, seconds) for v, rs in sorted(_by_variant(records).items())},
        "rollout": rollout,
        "decisions": _decisions(audit, result.started_wall),
        "polls": [{"t": round(p.at, 2), "phase": p.phase, "weight": p.weight} for p in polls],
        "timeline": _timeline(records, polls, candidate),
        "gateway_alive": alive,
    }


def write_json(report: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _series(timeline: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0) -> list[float]:
    return [math.nan if row.get(key) is None else row[key] * scale for row in timeline]


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Weights, error rate and p99 over time, with a marker at every decision."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    timeline = report["timeline"]
    t = [row["t"] + 0.5 for row in timeline]  # bucket centres
    fig, (ax_w, ax_e, ax_p) = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    polls = report["polls"]
    if polls:
        ax_w.step(
            [p["t"] for p in polls],
            [p["weight"] for p in polls],
            where="post",
            label="policy weight (candidate %)",
            color="tab:blue",
        )
    ax_w.plot(
        t,
        _series(timeline, "candidate_share", 100),
        "o",
        ms=3,
        color="tab:orange",
        label="answers from candidate (%)",
    )
    ax_w.set_ylabel("candidate %")
    ax_w.set_ylim(-5, 105)
    variants = sorted({v for row in timeline for v in row["p99_ms_by_variant"]})
    colours = {v: f"C{i}" for i, v in enumerate(variants)}
    for variant in variants:
        rates = [row["error_rate_by_variant"].get(variant) for row in timeline]
        p99s = [row["p99_ms_by_variant"].get(variant) for row in timeline]
        for ax, ys, scale, what in ((ax_e, rates, 100, "server errors"), (ax_p, p99s, 1, "p99")):
            ax.plot(
                t,
                [math.nan if y is None else scale * y for y in ys],
                color=colours[variant],
                marker=".",
                label=f"{what} {variant}",
            )
    ax_e.plot(
        t,
        _series(timeline, "error_rate", 100),
        "--",
        color="black",
        lw=1,
        label="server errors, all (%)",
    )
    for key, style, label in (
        ("rejected_503", "tab:purple", "503 overloaded"),
        ("dropped", "tab:gray", "dropped by client"),
    ):
        if any(row[key] for row in timeline):
            share = [
                100 * row[key] / row["arrivals"] if row["arrivals"] else math.nan
                for row in timeline
            ]
            ax_e.plot(t, share, ":", color=style, lw=2, label=f"{label} (% of arrivals)")
    ax_e.set_ylabel("errors, rejections (%)")
    ax_e.set_ylim(bottom=0, top=max(1.0, ax_e.get_ylim()[1]))
    ax_p.set_ylabel("p99 latency from schedule (ms)")
    ax_p.set_xlabel("seconds since load start")
    for decision in report["decisions"]:
        for ax in (ax_w, ax_e, ax_p):
            ax.axvline(decision["t"], color="black", ls="--", lw=0.8, alpha=0.7)
        ax_w.annotate(
            decision["action"],
            (decision["t"], 102),
            rotation=90,
            fontsize=8,
            ha="right",
            va="top",
            xytext=(-2, 0),
            textcoords="offset points",
        )
    for ax in (ax_w, ax_e, ax_p):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=8)
    rollout = report.get("rollout") or {}
    verdict = "PASS" if report.get("passed") else "FAIL"
    fig.suptitle(
        f"{report['scenario']}: {rollout.get('stable')} → {rollout.get('candidate')} "
        f"({rollout.get('strategy')}), final phase {rollout.get('phase')} — {verdict}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
