"""A/A false rollbacks, power, promoted regressions and healthy canaries of rollguard's rollouts.

Run `python load_tests/policy_simulation.py [--quick] [--workers N] [--scenario PREFIX]
[--skip PREFIX] [--reps N | --scale X] [--out FILE.json]`, or `--render FILE.json` for
the tables of an earlier run (a full run rewrites its --out file as it goes, so a run
stopped early can be rendered too). Every replicate is one rollout run
through the gateway's own decision code (load_tests/sim_gateway.py: the rollout shell,
its state directory and audit log, the real VariantWindows, split tables and feedback
index) on a simulated clock, request by request, until the rollout ends or the horizon:

- A/A (both versions alike): the share of rollouts ever rolled back, with its upper 95 %
  Wilson bound, which must be ≤ the policy's alpha. Today's configurations (canary
  5 → 25 → 50 % and a fixed 10 %; error rates 0.1, 1, 5 %; the default checks, margin 0,
  a tight latency ratio; looks every 1,000 requests, and every 100 for the three that
  came closest to alpha in the earlier table) plus base rates drifting in both arms
  while the weights ramp, sticky Zipf users with per-user error rates, delayed labels,
  and a restart halfway (state reloaded from the state directory).
- Power: candidate requests until rollback (median, p90) for injected regressions.
  Where checks offer a choice of test (`test: conditional | msprt`), the drift row and
  two power rows are run with the two-sample mSPRT as well.
- Regressions promoted: 1 % → 2 % errors under the default policy, the README's example
  and the shipped config/policies/fraud-canary.yaml, at 100 req/s and at 50 req/min.
- Healthy canaries: how each policy's rollouts end (promoted within its schedule,
  rolled back, inconclusive, or still undecided at the horizon: stalled).

`--quick` runs every scenario once on a short horizon (a smoke test: the tables have
every row; no statistical claim). The full size runs on `--workers`
processes (default 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from load_tests.sim_gateway import Traffic, run_replicate  # noqa: E402

RATE = 100.0  # requests per second, unless a scenario says otherwise
SLOW_RATE = 50 / 60  # 50 requests a minute
POWER_HORIZON = 100_000  # requests; 5,000 to the candidate at a 5 % step
HEALTHY_HORIZON = 400_000  # requests: 67 minutes at 100 req/s

DEFAULT_CHECKS: list[dict[str, Any]] = [
    {"metric": "error_rate", "max_increase_vs_stable": 0.005},
    {"metric": "latency_p99", "max_ratio_to_stable": 1.2},
    {"metric": "accuracy", "max_drop_vs_stable": 0.01},
    {"metric": "srm", "on_fail": "hold"},
]
STRICT_CHECKS: list[dict[str, Any]] = [  # margin 0: the test itself, right at its null
    {"metric": "error_rate", "max_increase_vs_stable": 0.0},
    {"metric": "accuracy", "max_drop_vs_stable": 0.0},
]
TIGHT_LATENCY: list[dict[str, Any]] = [{"metric": "latency_p99", "max_ratio_to_stable": 1.1}]
# Steps that ramp on schedule whatever the evidence (no_fail): for drift under ramping weights.
RAMP_CHECKS: list[dict[str, Any]] = [
    {"metric": "error_rate", "max_increase_vs_stable": 0.005, "pass_when": "no_fail"},
    {"metric": "latency_p99", "max_ratio_to_stable": 1.2, "pass_when": "no_fail"},
]
RAMP_ACCURACY: list[dict[str, Any]] = [
    {"metric": "accuracy", "max_drop_vs_stable": 0.01, "pass_when": "no_fail"},
]
CANARY: list[dict[str, Any]] = [
    {"weight": 5, "hold": "40s"},
    {"weight": 25, "hold": "60s"},
    {"weight": 50},
]
FIXED10: list[dict[str, Any]] = [{"weight": 10}]
RAMP: list[dict[str, Any]] = [
    {"weight": 5, "hold": "100s"},
    {"weight": 25, "hold": "100s"},
    {"weight": 50, "hold": "250s"},
    {"weight": 100},
]
# "The shipped defaults": every field at its default but the checks and steps a policy
# must name (the default checks above, a canary that ends at 100 %).
DEFAULTS_STEPS: list[dict[str, Any]] = [
    {"weight": 5, "hold": "60s"},
    {"weight": 25, "hold": "60s"},
    {"weight": 50, "hold": "60s"},
    {"weight": 100},
]


def policy(
    steps: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    *,
    interval: float = 5.0,
    sticky: bool = False,
    name: str = "sim",
) -> str:
    spec: dict[str, Any] = {
        "model": "sim",
        "stable": "1",
        "candidate": "2",
        "split": "hash" if sticky else "random",
        "steps": steps,
        "interval": interval,
        "checks": checks,
    }
    if sticky:
        spec["key"] = "header:x-user"
    doc = {"apiVersion": "rollguard/v1", "kind": "Rollout", "metadata": {"name": name}}
    return yaml.safe_dump(doc | {"spec": spec}, sort_keys=False)


def readme_policy() -> str:
    """The example policy of README.md's "Rollout policies" section, as written there."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Rollout policies") :]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    if match is None:
        raise ValueError("README.md: no yaml example in the Rollout policies section")
    return match.group(1)


def shipped_policy() -> str:
    return (ROOT / "config" / "policies" / "fraud-canary.yaml").read_text()


def defaults_policy() -> str:
    return policy(DEFAULTS_STEPS, DEFAULT_CHECKS, sticky=True)


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # aa | power | promoted | healthy
    policy: str  # Rollout YAML
    traffic: Traffic
    horizon: int  # requests
    reps: int  # at full size
    restart_at: float | None = None  # share of the horizon
    looks_every: float = 0.0  # requests per tick, for the tables
    alpha: float = 0.05
    schedule_s: float = 0.0  # the policy's shortest way to promotion (sum of holds)
    label: str = ""  # the policy's name in tables

    def quick(self) -> Scenario:
        """One replicate of at most 1,000 requests (60 at 50 req/min): a smoke test."""
        most = max(60, round(1000 * min(1.0, self.traffic.rate / RATE)))
        return replace(self, reps=1, horizon=min(self.horizon, most))


def _policy_meta(text: str) -> tuple[float, float, float]:
    """(interval, alpha, sum of step holds) of a policy, through the real schema."""
    from rollguard.policy.schema import Rollout

    spec = Rollout.model_validate(yaml.safe_load(text)).spec
    return spec.interval, spec.alpha, sum(s.hold for s in spec.steps)


def scenarios() -> list[Scenario]:
    out: list[Scenario] = []

    def add(
        name: str,
        kind: str,
        text: str,
        traffic: Traffic,
        horizon: int,
        reps: int,
        label: str = "",
        restart_at: float | None = None,
    ) -> None:
        interval, alpha, holds = _policy_meta(text)
        out.append(
            Scenario(
                name,
                kind,
                text,
                traffic,
                horizon,
                reps,
                restart_at,
                interval * traffic.rate,
                alpha,
                holds,
                label,
            )
        )

    # -- A/A: today's configurations, looks every 1,000 requests; the three that came
    # closest to alpha in today's table also every 100 (a look costs milliseconds)
    closest = ("aa_canary_err0.01", "aa_strict_canary_err0.01", "aa_tight_latency_canary")
    for looks in (1000, 100):
        interval = looks / RATE
        configs = [
            (f"aa_{sched}_err{p:g}", policy(steps, DEFAULT_CHECKS, interval=interval), p)
            for sched, steps in (("canary", CANARY), ("fixed10", FIXED10))
            for p in (0.001, 0.01, 0.05)
        ]
        configs += [
            (f"aa_strict_canary_err{p:g}", policy(CANARY, STRICT_CHECKS, interval=interval), p)
            for p in (0.001, 0.01, 0.05)
        ]
        configs.append(
            ("aa_tight_latency_canary", policy(CANARY, TIGHT_LATENCY, interval=interval), 0.01)
        )
        for name, text, p in configs:
            if looks == 1000 or name in closest:
                add(f"{name}@{looks}", "aa", text, Traffic(error=(p, p)), 20_000, 75)
    # -- A/A: the new conditions
    drift = Traffic(error=(0.005, 0.005), error_end=(0.02, 0.02), latency_end=1.3)
    add("aa_drift_ramp", "aa", policy(RAMP, RAMP_CHECKS), drift, 50_000, 75)
    # accuracy falling from 95 % to 80 % in both arms while the weights ramp
    acc_drift = Traffic(accuracy=(0.95, 0.95), accuracy_drop=0.15)
    add("aa_accuracy_drift_ramp", "aa", policy(RAMP, RAMP_ACCURACY), acc_drift, 50_000, 75)
    sticky = Traffic(users=20_000, heterogeneity=0.5)
    add(
        "aa_sticky_zipf_users",
        "aa",
        policy(CANARY, DEFAULT_CHECKS, sticky=True),
        sticky,
        40_000,
        75,
    )
    for delay in (5000, 30_000):
        add(
            f"aa_labels_delay{delay}",
            "aa",
            policy(CANARY, DEFAULT_CHECKS),
            Traffic(label_delay=float(delay)),
            60_000,
            40,
        )
    add(
        "aa_restart_midway",
        "aa",
        policy(CANARY, DEFAULT_CHECKS),
        Traffic(),
        20_000,
        75,
        restart_at=0.5,
    )
    # -- Power: candidate requests to rollback (default checks, canary 5 → 25 → 50 %).
    # A candidate that is not shown healthy stays at 5 %: 100,000 requests give it 5,000,
    # past every target (50,000 gave 2,500, below the accuracy target of 3,000).
    power = policy(CANARY, DEFAULT_CHECKS, interval=1.0)
    for name, traffic in (
        ("power_err_1to2", Traffic(error=(0.01, 0.02))),
        ("power_latency_+20%", Traffic(latency=(1.0, 1.2))),
        ("power_accuracy_-3pt", Traffic(accuracy=(0.90, 0.87))),
        ("power_hard_failure_0to5", Traffic(error=(0.0, 0.05))),
        # the same accuracy drop where every answer's label comes back (the row above
        # has 60 % labelled): how much of its cost is labels that never arrive
        ("power_accuracy_-3pt_all_labelled", Traffic(accuracy=(0.90, 0.87), label_rate=1.0)),
    ):
        add(name, "power", power, traffic, POWER_HORIZON, 25)
    # -- The same with the two-sample mSPRT, where checks offer a choice of test
    if _offers_test_choice():
        add("aa_drift_ramp[msprt]", "aa", policy(RAMP, _msprt(RAMP_CHECKS)), drift, 50_000, 75)
        msprt = policy(CANARY, _msprt(DEFAULT_CHECKS), interval=1.0)
        add("power_err_1to2[msprt]", "power", msprt, Traffic(error=(0.01, 0.02)), 50_000, 25)
        add("power_latency_+20%[msprt]", "power", msprt, Traffic(latency=(1.0, 1.2)), 50_000, 25)
    # -- Regressions promoted and healthy canaries, per policy
    named = (
        ("defaults", defaults_policy()),
        ("readme", readme_policy()),
        ("shipped", shipped_policy()),
    )
    regression = Traffic(error=(0.01, 0.02))
    for label, text in named:
        add(f"promoted_err_1to2_{label}@100rps", "promoted", text, regression, 100_000, 100, label)
        slow = replace(regression, rate=SLOW_RATE)
        add(f"promoted_err_1to2_{label}@50rpm", "promoted", text, slow, 6_000, 10, label)
        # 67 minutes: past the shipped policy's 30-minute deadline and the default
        # deadline of a policy without one (its holds + 1 h: 63 minutes for defaults)
        add(f"healthy_{label}", "healthy", text, Traffic(), HEALTHY_HORIZON, 12, label)
    # The issue measured 8.7 % of −3-point accuracy regressions promoted under README's
    # example (accuracy max_drop_vs_stable 0.02, so −3 points is past its margin).
    add(
        "promoted_acc_-3pt_readme@100rps",
        "promoted",
        readme_policy(),
        Traffic(accuracy=(0.90, 0.87)),
        100_000,
        100,
        "readme",
    )
    return out


def _offers_test_choice() -> bool:
    from rollguard.policy.schema import Check

    return "test" in Check.model_fields


def _msprt(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The checks with error and latency comparisons on the two-sample mSPRT."""
    compared = ("max_increase_vs_stable", "max_ratio_to_stable")
    return [c | {"test": "msprt"} if any(k in c for k in compared) else c for c in checks]


# -- running


def _seed(name: str, rep: int, base: int) -> int:
    digest = hashlib.blake2b(f"{base}/{name}/{rep}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _one(task: tuple[Scenario, int, int]) -> tuple[str, dict[str, Any]]:
    sc, rep, base = task
    logging.getLogger("rollguard").setLevel(logging.ERROR)  # "no drift reference": expected
    restart = None if sc.restart_at is None else int(sc.horizon * sc.restart_at)
    started = time.perf_counter()
    result = run_replicate(
        sc.policy, sc.traffic, sc.horizon, _seed(sc.name, rep, base), restart_at=restart
    )
    return sc.name, asdict(result) | {"wall_s": time.perf_counter() - started}


def run(
    chosen: list[Scenario], workers: int, seed: int, snapshot: Path | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Every replicate of every scenario; results per scenario name.

    Replicates run in rounds across scenarios (each scenario's first share of its
    replicates, then the next), longest first within a round, so a run stopped early
    still has every scenario at about the same share; `snapshot` is rewritten (as
    `--out` writes it) after every twentieth of the work."""
    tasks = [(sc, rep, seed) for sc in chosen for rep in range(sc.reps)]
    tasks.sort(key=lambda t: (round(20 * t[1] / t[0].reps), -_ticks(t[0])))
    results: dict[str, list[dict[str, Any]]] = {sc.name: [] for sc in chosen}
    started = time.perf_counter()
    every = max(1, len(tasks) // 20)
    with multiprocessing.get_context("spawn").Pool(max(1, workers)) as pool:
        for done, (name, res) in enumerate(pool.imap_unordered(_one, tasks, chunksize=1), 1):
            results[name].append(res)
            if done % every == 0:
                print(f"{done}/{len(tasks)} rollouts", file=sys.stderr, flush=True)
                if snapshot is not None:
                    sums = [Summary(sc, results[sc.name]) for sc in chosen]
                    _write(snapshot, sums, time.perf_counter() - started, quick=False)
    return results


def _ticks(sc: Scenario) -> float:
    return sc.horizon / sc.looks_every if sc.looks_every else 0.0


def _write(path: Path, sums: list[Summary], seconds: float, *, quick: bool) -> None:
    doc = {
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _commit(),
        "seconds": seconds,
        "quick": quick,
        "scenarios": [
            {"scenario": s.sc.name, "kind": s.sc.kind, "alpha": s.sc.alpha, "replicates": s.reps}
            for s in sums
        ],
    }
    path.write_text(json.dumps(doc, indent=1))


# -- tables


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Summary:
    """One scenario's replicates, counted."""

    sc: Scenario
    reps: list[dict[str, Any]] = field(default_factory=list)

    def count(self, end: str) -> int:
        return sum(r["end"] == end for r in self.reps)

    @property
    def n(self) -> int:
        return len(self.reps)

    def failed_by(self) -> str:
        metrics: dict[str, int] = {}
        for r in self.reps:
            if r["end"] == "rolled_back":
                why = "deadline" if r["reason"].startswith("inconclusive") else "other"
                for m in r["failed"] or [why]:
                    metrics[m] = metrics.get(m, 0) + 1
        return ", ".join(f"{m} {k}" for m, k in sorted(metrics.items())) or "-"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _bound(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"[{_pct(lo)}, {_pct(hi)}]"


def markdown(sums: list[Summary]) -> str:
    out: list[str] = []
    aa = [s for s in sums if s.sc.kind == "aa"]
    if aa:
        out += [
            "### A/A: rollouts ever rolled back (both versions alike)\n",
            "| scenario | looks every (requests) | reps | rolled back | rate | Wilson 95 % | ≤ α"
            " | by check | ever held (by) | promoted | undecided at horizon |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in aa:
            k, n = s.count("rolled_back"), s.n
            held: dict[str, int] = {}
            for r in s.reps:
                for m in r["holds"]:
                    held[m] = held.get(m, 0) + 1
            held_s = ", ".join(f"{m} {c}" for m, c in sorted(held.items())) or "0"
            ok = _shown(k, n, s.sc.alpha)
            out.append(
                f"| {s.sc.name} | {s.sc.looks_every:g} | {n} | {k} | {_pct(k / n if n else 0)}"
                f" | {_bound(k, n)} | {ok} | {s.failed_by()} | {held_s} | {s.count('promoted')}"
                f" | {s.count('running')} |"
            )
        for s in aa:
            if s.sc.restart_at is not None:
                resumed = sum(r.get("resumed", 0) for r in s.reps)
                restarts = sum(r.get("restarts", 0) for r in s.reps)
                out.append(
                    f"\n{s.sc.name}: {resumed} of {restarts} restarts resumed the rollout at"
                    " its phase, step, weight and generation (state reloaded from the state"
                    " directory)."
                )
        labelled = [s for s in aa if s.sc.name.startswith("aa_labels")]
        if labelled:
            out += [
                "\nLabels per rollout (mean): posted for each arm's requests, and counted by"
                " the arm's window at the end.\n",
                "| scenario | stable posted | stable counted | candidate posted |"
                " candidate counted |",
                "|---|---|---|---|---|",
            ]
            for s in labelled:
                sent = np.mean([r["labels_sent"] for r in s.reps], axis=0)
                got = np.mean([r["labels_counted"] for r in s.reps], axis=0)
                out.append(
                    f"| {s.sc.name} | {sent[0]:.0f} | {got[0]:.0f} | {sent[1]:.0f} | {got[1]:.0f} |"
                )
    power = [s for s in sums if s.sc.kind == "power"]
    if power:
        out += [
            "\n### Power: candidate requests until rollback (looks every 100 requests)\n",
            "| scenario | horizon | reps | rolled back | share | median | p90 | target |",
            "|---|---|---|---|---|---|---|---|",
        ]
        targets = {"err": 3000, "latency": 2000, "accuracy": 3000, "hard": 150}
        for s in power:
            caught = [r["candidate_requests"] for r in s.reps if r["end"] == "rolled_back"]
            # Undetected runs count as never (infinite) for the quantiles.
            values = sorted(caught) + [math.inf] * (s.n - len(caught))
            med, p90 = (_quantile(values, q) for q in (0.5, 0.9))
            target = next(v for k, v in targets.items() if k in s.sc.name)
            met = "met" if p90 <= target else "median met" if med <= target else "NOT met"
            out.append(
                f"| {s.sc.name} | {s.sc.horizon} | {s.n} | {len(caught)}"
                f" | {_pct(len(caught) / s.n if s.n else 0)} | {_num(med)} | {_num(p90)}"
                f" | ≤ {target}: {met} |"
            )
    promoted = [s for s in sums if s.sc.kind == "promoted"]
    if promoted:
        out += [
            "\n### Regressions promoted (1 % → 2 % errors, or −3 accuracy points)\n",
            "| policy | regression | traffic | horizon | reps | promoted | Wilson 95 % | ≤ 1 %"
            " | rolled back | inconclusive | undecided at horizon"
            " | median candidate requests to rollback |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in promoted:
            k, n = s.count("promoted"), s.n
            caught = [r["candidate_requests"] for r in s.reps if r["end"] == "rolled_back"]
            rate = "100 req/s" if s.sc.traffic.rate == RATE else "50 req/min"
            hours = s.sc.horizon / s.sc.traffic.rate / 3600
            regression = "−3 accuracy points" if "_acc_" in s.sc.name else "1 % → 2 % errors"
            out.append(
                f"| {s.sc.label} | {regression} | {rate} | {hours:.2g} h | {n}"
                f" | {k} ({_pct(k / n if n else 0)})"
                f" | {_bound(k, n)} | {_shown(k, n, 0.01)}"
                f" | {s.count('rolled_back')} | {s.count('inconclusive')} | {s.count('running')}"
                f" | {_num(float(np.median(caught))) if caught else '-'} |"
            )
    healthy = [s for s in sums if s.sc.kind == "healthy"]
    if healthy:
        out += [
            "\n### Healthy canaries (both versions alike, 100 req/s)\n",
            "| policy | reps | schedule (holds) | promoted within 2× schedule | promoted |"
            " median time to promote | rolled back (by) | inconclusive | stalled at horizon |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in healthy:
            budget = max(2 * s.sc.schedule_s, 60.0)
            times = [r["seconds"] for r in s.reps if r["end"] == "promoted"]
            within = sum(t <= budget for t in times)
            hours = s.sc.horizon / s.sc.traffic.rate / 3600
            out.append(
                f"| {s.sc.label} | {s.n} | {s.sc.schedule_s:g} s | {within}"
                f" ({_pct(within / s.n if s.n else 0)}) | {len(times)}"
                f" | {f'{np.median(times):.0f} s' if times else '-'}"
                f" | {s.count('rolled_back')} ({s.failed_by()}) | {s.count('inconclusive')}"
                f" | {s.count('running')} (of {hours:.2g} h) |"
            )
    return "\n".join(out)


def _shown(k: int, n: int, limit: float) -> str:
    """yes: the upper Wilson bound is within the limit; NO: the rate itself is above it;
    otherwise too few replicates to show it either way."""
    if wilson(k, n)[1] <= limit:
        return "yes"
    return "NO" if n and k / n > limit else f"not shown (n = {n})"


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.inf
    i = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
    return values[i]


def _num(x: float) -> str:
    return "never" if math.isinf(x) else f"{x:.0f}"


def _commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "policy", "proxy"],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip() + (" + uncommitted policy/proxy changes" if dirty.stdout else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 replicate, short horizons")
    parser.add_argument("--reps", type=int, default=None, help="replicates per scenario")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply full-size reps")
    parser.add_argument("--scenario", action="append", default=[], help="name prefix (repeatable)")
    parser.add_argument("--skip", action="append", default=[], help="name prefix to leave out")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON")
    parser.add_argument("--render", type=Path, default=None, help="tables of a --out file")
    args = parser.parse_args(argv)
    chosen = scenarios()
    if args.render is not None:
        doc = json.loads(args.render.read_text())
        known = {sc.name: sc for sc in chosen}
        sums = [
            Summary(known[s["scenario"]], s["replicates"])
            for s in doc["scenarios"]
            if s["scenario"] in known and s["replicates"]
        ]
        print(
            f"{doc['when']}, commit {doc['commit']}, {sum(s.n for s in sums)} rollouts"
            f" in {doc['seconds']:.0f} s\n"
        )
        print(markdown(sums))
        return 0
    if args.scenario:
        chosen = [s for s in chosen if any(s.name.startswith(p) for p in args.scenario)]
        if not chosen:
            parser.error(f"no scenario starts with {args.scenario}")
    chosen = [s for s in chosen if not any(s.name.startswith(p) for p in args.skip)]
    if args.quick:
        chosen = [s.quick() for s in chosen]
    if args.reps is not None:
        chosen = [replace(s, reps=args.reps) for s in chosen]
    elif args.scale != 1.0:
        chosen = [replace(s, reps=max(2, round(s.reps * args.scale))) for s in chosen]
    started = time.perf_counter()
    results = run(chosen, args.workers, args.seed, None if args.quick else args.out)
    seconds = time.perf_counter() - started
    sums = [Summary(sc, results[sc.name]) for sc in chosen]
    for s in sums:
        wall = sum(r["wall_s"] for r in s.reps)
        print(f"{s.sc.name}: {s.n} rollouts, {wall:.1f} s of work", file=sys.stderr)
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(
        f"{when}, commit {_commit()}, {sum(s.n for s in sums)} rollouts in {seconds:.0f} s"
        f" on {args.workers} worker(s){' (--quick)' if args.quick else ''}\n"
    )
    print(markdown(sums))
    if args.out is not None:
        _write(args.out, sums, seconds, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
