"""What a sidecar user feels at their normal load: added latency at a fixed (open-loop) rate,
and what each shadow target really mirrored.

After the closed-loop rounds have measured each target's capacity, every latency target
is sent the same fixed arrival rate, a share (50 %, 80 %) of the direct upstream's (bare's)
capacity in its slowest closed-loop round, with load_tests/bench/openloop.py: latency
from each request's due time, so a queue cannot hide. Rounds are interleaved as the
closed-loop ones are. Added latency is a target's p50 (p99) minus bare's at the same
rate, in the same round.

Shadow targets also report, for every run (closed or open loop), the share of copies that
were really mirrored and the answers compared per second: rollguard's from its
`rollguard_shadow_requests_total` counters, nginx's mirror from the requests its mirror
upstream (bare B) answered.
"""

from __future__ import annotations

import re
import statistics
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from load_tests.bench import models, openloop
from load_tests.bench.targets import Target

OPEN_TARGETS = (
    "bare",
    "rollguard",
    "rollguard-shadow",
    "rollguard-proxy",
    "rollguard-proxy-shadow",
    "nginx-proxy",
    "nginx-mirror",
)
SHARES = (0.5, 0.8)
_SHADOW = re.compile(r'rollguard_shadow_requests_total\{[^}]*result="(\w+)"[^}]*\} (\S+)')
_STARTED = ("ok", "error", "timeout", "unavailable")  # copies that were sent
_NOT_SENT = ("shed", "dropped")


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None


def shadow_counts(target: Target) -> dict[str, float] | None:
    """Copies so far by result, for a target that mirrors (None for one that does not)."""
    if target.mirror_count:
        text = _get(target.mirror_count)
        return {"ok": float(text)} if text is not None else None
    if not target.admin or "shadow" not in target.name:
        return None
    text = _get(target.admin + "/metrics")
    if text is None:
        return None
    counts: dict[str, float] = {}
    for result, n in _SHADOW.findall(text):
        counts[result] = counts.get(result, 0.0) + float(n)
    return counts


def shadow_figures(
    before: dict[str, float] | None,
    after: dict[str, float] | None,
    primaries: int,
    duration_s: float,
) -> dict[str, float]:
    """mirrored_share (copies sent over copies wanted) and compared_per_s over one run."""
    if before is None or after is None:
        return {}

    def delta(keys: tuple[str, ...]) -> float:
        return sum(after.get(k, 0.0) - before.get(k, 0.0) for k in keys)

    answered = delta(("ok",))
    if set(after) == {"ok"}:  # nginx: every copy is sent; its mirror's answers are counted
        wanted = float(primaries)
        sent = answered
    else:
        sent = delta(_STARTED)
        wanted = sent + delta(_NOT_SENT)
    return {
        "mirrored_share": min(sent / wanted, 1.0) if wanted else float("nan"),
        "compared_per_s": answered / duration_s if duration_s > 0 else float("nan"),
    }


@dataclass
class OpenRun:
    """One open-loop run of one target at one share of the direct capacity."""

    target: str
    share: float
    rate: float
    round: int
    figures: dict[str, float] = field(default_factory=dict)


def open_rounds(
    started: list[Target],
    capacity: float,
    *,
    rounds: int,
    duration_s: float,
    log: Callable[[str], None],
    alive: Callable[[Target], bool],
) -> list[OpenRun]:
    """Every latency target at each share of `capacity` (bare's req/s), interleaved."""
    chosen = [t for t in started if t.name in OPEN_TARGETS]
    body = models.request_body()
    runs: list[OpenRun] = []
    for round_ in range(1, rounds + 1):
        order = chosen if round_ % 2 else list(reversed(chosen))
        for share in SHARES:
            rate = max(share * capacity, 1.0)
            for target in order:
                if not alive(target):
                    continue
                before = shadow_counts(target)
                result = openloop.run_url(
                    target.url, body, models.KEY_HEADER, rate=rate, duration_s=duration_s
                )
                figures = {
                    "rps": result.rps,
                    "p50_ms": result.p50_ms,
                    "p95_ms": result.p95_ms,
                    "p99_ms": result.p99_ms,
                    "errors": float(result.errors),
                    "requests": float(result.requests),
                }
                figures |= shadow_figures(
                    before, shadow_counts(target), result.requests, result.duration_s
                )
                runs.append(OpenRun(target.name, share, rate, round_, figures))
                extra = (
                    f"  mirrored {figures['mirrored_share']:.1%}  compared "
                    f"{figures['compared_per_s']:,.0f}/s"
                    if "mirrored_share" in figures
                    else ""
                )
                log(
                    f"open round {round_} {share:.0%} ({rate:,.0f}/s) {target.name:<24} "
                    f"p50 {result.p50_ms:6.2f}  p99 {result.p99_ms:7.2f} ms  errors "
                    f"{result.errors}{extra}"
                )
    return runs


def _median(values: list[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def _by(runs: list[dict[str, Any]], target: str, share: float) -> dict[int, dict[str, float]]:
    return {
        int(r["round"]): r["figures"] for r in runs if r["target"] == target and r["share"] == share
    }


def _paired(
    runs: list[dict[str, Any]], a: str, b: str, share: float
) -> list[tuple[dict[str, float], dict[str, float]]]:
    first, second = _by(runs, a, share), _by(runs, b, share)
    return [(first[k], second[k]) for k in sorted(first) if k in second]


def table(runs: list[dict[str, Any]]) -> list[str]:
    """Medians per (share, target): p50/p99, added over bare, mirrored share, compared/s."""
    lines = [
        "| load | target | rate/s | p50 ms | p99 ms | added p50 ms | added p99 ms | "
        "mirrored | compared/s | errors |",
        "|" + "---|" * 10,
    ]
    for share in sorted({r["share"] for r in runs}):
        for target in OPEN_TARGETS:
            own = _by(runs, target, share)
            if not own:
                continue
            bare = _by(runs, "bare", share)
            added = {
                f: _median([own[k][f] - bare[k][f] for k in own if k in bare])
                for f in ("p50_ms", "p99_ms")
            }
            rate = next(r["rate"] for r in runs if r["target"] == target and r["share"] == share)
            mirrored = _median([f.get("mirrored_share", float("nan")) for f in own.values()])
            compared = _median([f.get("compared_per_s", float("nan")) for f in own.values()])
            errors = int(sum(f["errors"] for f in own.values()))
            lines.append(
                f"| {share:.0%} | {target} | {rate:,.0f} | "
                f"{_median([f['p50_ms'] for f in own.values()]):.2f} | "
                f"{_median([f['p99_ms'] for f in own.values()]):.2f} | "
                + (
                    "— | — | "
                    if target == "bare"
                    else f"{added['p50_ms']:+.2f} | {added['p99_ms']:+.2f} | "
                )
                + (f"{mirrored:.1%} | {compared:,.0f} | " if mirrored == mirrored else "— | — | ")
                + f"{errors} |"
            )
    return lines


def must_show(runs: list[dict[str, Any]], closed: dict[str, Any]) -> list[str]:
    """The open-loop items of the issue's Must-show list, met or not, from per-round pairs.

    `closed`: target → Row of the closed-loop rounds (compared answers at saturation)."""
    lines: list[str] = []
    for shadow, plain in (
        ("rollguard-shadow", "rollguard"),
        ("rollguard-proxy-shadow", "rollguard-proxy"),
    ):
        pairs = _paired(runs, shadow, plain, 0.5)
        if not pairs:
            continue
        mirrored = _median([s.get("mirrored_share", float("nan")) for s, _ in pairs])
        p99 = _median([s["p99_ms"] / p["p99_ms"] for s, p in pairs if p["p99_ms"] > 0])
        met = mirrored >= 0.99 and p99 <= 1.2
        lines.append(
            f"- shadow 100 % ({shadow}) at 50 % load: mirrored {mirrored:.1%} (goal >= 99 %), "
            f"primary p99 {p99:.2f} x no shadow (goal <= 1.2) — {'met' if met else 'NOT MET'}"
        )
    direct = _by(runs, "bare", 0.5)
    ours, theirs = _by(runs, "rollguard-proxy", 0.5), _by(runs, "nginx-proxy", 0.5)
    rounds = [k for k in ours if k in theirs and k in direct]
    if rounds:
        p50_gap = _median(
            [
                (ours[k]["p50_ms"] - direct[k]["p50_ms"])
                - (theirs[k]["p50_ms"] - direct[k]["p50_ms"])
                for k in rounds
            ]
        )
        ours99 = _median([ours[k]["p99_ms"] - direct[k]["p99_ms"] for k in rounds])
        theirs99 = _median([theirs[k]["p99_ms"] - direct[k]["p99_ms"] for k in rounds])
        ratio99 = ours99 / theirs99 if theirs99 > 0 else float("inf")
        met = p50_gap <= 0.5 and (ours99 <= 0 or ratio99 <= 1.5)
        lines.append(
            f"- added latency at 50 % load, rollguard proxy vs nginx proxy: p50 "
            f"{p50_gap:+.2f} ms over nginx's added p50 (goal within 0.5 ms); added p99 "
            f"{ours99:+.2f} ms against nginx's {theirs99:+.2f} ms ({ratio99:.2f} x, goal "
            f"<= 1.5) — {'met' if met else 'NOT MET'}"
        )
    for shadow in ("rollguard-shadow", "rollguard-proxy-shadow"):
        if shadow in closed and "nginx-mirror" in closed:
            ours_c = closed[shadow].figure("compared_per_s")
            theirs_c = closed["nginx-mirror"].figure("compared_per_s")
            met = ours_c >= theirs_c
            lines.append(
                f"- at saturation, compared answers/s: {shadow} {ours_c:,.0f} against nginx "
                f"mirror's {theirs_c:,.0f} — {'met' if met else 'NOT MET'}"
            )
    return lines
