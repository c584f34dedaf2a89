"""What a sidecar user feels at their normal load: added latency at a fixed (open-loop) rate,
and what each shadow target really mirrored.

After the closed-loop rounds have measured each target's capacity, every latency target
is sent the same fixed arrival rate, a share (50 %, 80 %) of the direct upstream's (bare's)
capacity in its slowest closed-loop round, with load_tests/bench/openloop.py: latency
from each request's due time, so a queue cannot hide. Rounds are interleaved as the
closed-loop ones are. Added latency is a target's p50 (p99) minus bare's at the same
rate, in the same round.

The issue's shadow goal is set against the shadow's own mode instead: each shadow target
and its no-shadow twin (rollguard-shadow and rollguard, rollguard-proxy-shadow and
rollguard-proxy) are sent 50 % of the twin's capacity in its slowest closed-loop round,
back to back in each round. A 100 % shadow doubles the work behind every request, so at
a share of bare's capacity it can already be over its own (the proxy runs at about half
of bare's capacity on this machine's two cores).

Before each open run the harness waits (up to 30 s) for the host's CPUs to be under
15 % busy: a run that overloaded its servers (a mirror at a rate its shadow upstream
cannot keep) leaves them working through a backlog after its client stops, and the next
target would pay for it in its p99.

Shadow targets also report, for every run (closed or open loop), the share of copies that
were really mirrored and the answers compared per second: rollguard's from its
`rollguard_shadow_requests_total` counters, nginx's mirror from the requests its mirror
upstream (bare B) answered.
"""

from __future__ import annotations

import re
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
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
SHADOW_PAIRS = (
    ("rollguard-shadow", "rollguard"),
    ("rollguard-proxy-shadow", "rollguard-proxy"),
    # The same goal's figures for nginx's mirror, not judged: what the machine allows a
    # proxy whose every copy is a second upstream call on the same cores.
    ("nginx-mirror", "nginx-proxy"),
)
SHADOW_SHARE = 0.5  # of the no-shadow twin's capacity (the Must show)
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
    """One open-loop run of one target at one share of a capacity: bare's (the direct
    upstream's), or for the shadow pairs the no-shadow twin's (`basis`)."""

    target: str
    share: float
    rate: float
    round: int
    figures: dict[str, float] = field(default_factory=dict)
    basis: str = "bare"


SETTLED = 0.15  # host CPU busy share (of all cores) under which a run may start
SETTLE_LIMIT_S = 30.0


def _host_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all the host's CPUs since boot (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def settle(limit_s: float = SETTLE_LIMIT_S) -> tuple[float, float]:
    """Wait until the host is quiet: an overloaded run (a mirror at a rate its shadow
    upstream cannot keep) leaves its servers working through a backlog after its
    client stops, on the cores the next target's run needs. Returns (seconds waited,
    the last busy share); gives up after `limit_s`."""
    began = time.monotonic()
    busy = 1.0
    while time.monotonic() - began < limit_s:
        b0, t0 = _host_jiffies()
        time.sleep(0.25)
        b1, t1 = _host_jiffies()
        busy = (b1 - b0) / max(t1 - t0, 1)
        if busy < SETTLED:
            break
    return time.monotonic() - began, busy


def open_rounds(
    started: list[Target],
    capacities: dict[str, float],
    *,
    rounds: int,
    duration_s: float,
    log: Callable[[str], None],
    alive: Callable[[Target], bool],
    settle_s: float = SETTLE_LIMIT_S,
) -> list[OpenRun]:
    """Every latency target at each share of bare's capacity, then each shadow pair at
    half its no-shadow twin's, interleaved. `capacities`: req/s of each target in its
    slowest closed-loop round (bare's is required). `settle_s`: the longest wait for a
    quiet host before each run."""
    chosen = [t for t in started if t.name in OPEN_TARGETS]
    by_name = {t.name: t for t in chosen}
    runs: list[OpenRun] = []

    def run(target: Target, share: float, rate: float, round_: int, basis: str) -> None:
        if not alive(target):
            return
        waited, busy = settle(settle_s)
        if busy > SETTLED:
            log(f"  (the machine stayed {busy:.0%} busy for {waited:.0f} s before {target.name})")
        before = shadow_counts(target)
        result = openloop.run_url(
            target.url, models.request_body(), models.KEY_HEADER, rate=rate, duration_s=duration_s
        )
        figures = {
            "rps": result.rps,
            "p50_ms": result.p50_ms,
            "p95_ms": result.p95_ms,
            "p99_ms": result.p99_ms,
            "errors": float(result.errors),
            "requests": float(result.requests),
        }
        figures |= shadow_figures(before, shadow_counts(target), result.requests, result.duration_s)
        runs.append(OpenRun(target.name, share, rate, round_, figures, basis))
        extra = (
            f"  mirrored {figures['mirrored_share']:.1%}  compared "
            f"{figures['compared_per_s']:,.0f}/s"
            if "mirrored_share" in figures
            else ""
        )
        log(
            f"open round {round_} {share:.0%} of {basis} ({rate:,.0f}/s) {target.name:<24} "
            f"p50 {result.p50_ms:6.2f}  p99 {result.p99_ms:7.2f} ms  errors "
            f"{result.errors}{extra}"
        )

    for round_ in range(1, rounds + 1):
        order = chosen if round_ % 2 else list(reversed(chosen))
        for share in SHARES:
            rate = max(share * capacities["bare"], 1.0)
            for target in order:
                run(target, share, rate, round_, "bare")
        for shadow, plain in SHADOW_PAIRS:
            if shadow not in by_name or plain not in by_name or plain not in capacities:
                continue
            rate = max(SHADOW_SHARE * capacities[plain], 1.0)
            pair = (by_name[plain], by_name[shadow])
            for target in pair if round_ % 2 else pair[::-1]:
                run(target, SHADOW_SHARE, rate, round_, plain)
    return runs


def _median(values: list[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def _by(
    runs: list[dict[str, Any]], target: str, share: float, basis: str = "bare"
) -> dict[int, dict[str, float]]:
    return {
        int(r["round"]): r["figures"]
        for r in runs
        if r["target"] == target and r["share"] == share and r.get("basis", "bare") == basis
    }


def _paired(
    runs: list[dict[str, Any]], a: str, b: str, share: float, basis: str = "bare"
) -> list[tuple[dict[str, float], dict[str, float]]]:
    first, second = _by(runs, a, share, basis), _by(runs, b, share, basis)
    return [(first[k], second[k]) for k in sorted(first) if k in second]


def table(runs: list[dict[str, Any]]) -> list[str]:
    """Medians per (share, target): p50/p99, added over bare, mirrored share, compared/s."""
    lines = [
        "| load | target | rate/s | p50 ms | p99 ms | added p50 ms | added p99 ms | "
        "mirrored | compared/s | errors |",
        "|" + "---|" * 10,
    ]
    for share in sorted({r["share"] for r in runs if r.get("basis", "bare") == "bare"}):
        for target in OPEN_TARGETS:
            own = _by(runs, target, share)
            if not own:
                continue
            bare = _by(runs, "bare", share)
            added = {
                f: _median([own[k][f] - bare[k][f] for k in own if k in bare])
                for f in ("p50_ms", "p99_ms")
            }
            rate = next(
                r["rate"]
                for r in runs
                if r["target"] == target
                and r["share"] == share
                and r.get("basis", "bare") == "bare"
            )
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


def shadow_table(runs: list[dict[str, Any]]) -> list[str]:
    """Each shadow pair at half its no-shadow twin's capacity: medians over rounds, and the
    per-round ratio of the shadow's primary p99 to the twin's."""
    lines = [
        "| shadow target | rate/s (50 % of the twin's) | p50 ms | p99 ms | twin p50 ms | "
        "twin p99 ms | p99 x twin | mirrored | compared/s | errors |",
        "|" + "---|" * 10,
    ]
    for shadow, plain in SHADOW_PAIRS:
        pairs = _paired(runs, shadow, plain, SHADOW_SHARE, plain)
        if not pairs:
            continue
        rate = next(r["rate"] for r in runs if r["target"] == shadow and r.get("basis") == plain)
        lines.append(
            f"| {shadow} | {rate:,.0f} | {_median([s['p50_ms'] for s, _ in pairs]):.2f} | "
            f"{_median([s['p99_ms'] for s, _ in pairs]):.2f} | "
            f"{_median([p['p50_ms'] for _, p in pairs]):.2f} | "
            f"{_median([p['p99_ms'] for _, p in pairs]):.2f} | "
            f"{_median([s['p99_ms'] / p['p99_ms'] for s, p in pairs if p['p99_ms'] > 0]):.2f} | "
            f"{_median([s.get('mirrored_share', float('nan')) for s, _ in pairs]):.1%} | "
            f"{_median([s.get('compared_per_s', float('nan')) for s, _ in pairs]):,.0f} | "
            f"{int(sum(s['errors'] for s, _ in pairs))} |"
        )
    return lines if len(lines) > 2 else []


def must_show(runs: list[dict[str, Any]], closed: dict[str, Any]) -> list[str]:
    """The open-loop items of the issue's Must-show list, met or not, from per-round pairs.

    `closed`: target → Row of the closed-loop rounds (compared answers at saturation)."""
    lines: list[str] = []
    for shadow, plain in SHADOW_PAIRS:
        pairs = _paired(runs, shadow, plain, SHADOW_SHARE, plain)
        if not pairs:
            continue
        mirrored = _median([s.get("mirrored_share", float("nan")) for s, _ in pairs])
        p99 = _median([s["p99_ms"] / p["p99_ms"] for s, p in pairs if p["p99_ms"] > 0])
        met = mirrored >= 0.99 and p99 <= 1.2
        figures = (
            f"at 50 % of {plain}'s capacity: mirrored {mirrored:.1%} (goal >= 99 %), primary "
            f"p99 {p99:.2f} x {plain}'s at that rate (goal <= 1.2)"
        )
        if not shadow.startswith("rollguard"):
            lines.append(f"- reference, not judged: {shadow} {figures}")
            continue
        lines.append(f"- shadow 100 % ({shadow}) {figures} — {'met' if met else 'NOT MET'}")
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
