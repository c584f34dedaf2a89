"""A/A false-rollback rate and power of rollguard's checks when they are looked at often.

Run `python load_tests/policy_simulation.py [--replicates N] [--quick] [--scenario NAME]
[--out FILE.json]`. Each replicate streams `horizon` requests through a split (a
5 % → 25 % → 50 % canary, or a fixed 10 %): Bernoulli errors, lognormal latencies
(median 50 ms, σ 0.5), labels for 60 % of requests that come back in batches after an
exponential delay (mean 1000 requests).
At every 10th, 100th and 1000th request the evidence the gateway would hold is built and
the policy's checks decide. A/A scenarios count replicates that ever roll back (or, for
SRM, ever hold): the rate's upper 95 % Wilson bound must be ≤ alpha. Power scenarios
inject a regression and report the share detected and the candidate requests until FAIL.

Vectorised with numpy: per-replicate cumulative counts at every look, and each check's
FAIL condition computed with the same policy.sequential / policy.srm functions the checks
use. That screen only chooses where to look: every FAIL counted is a verdict of the real
policy.checks.evaluate_checks on the real evidence of that look, and a random sample of
looks the screen passed over is also run through evaluate_checks (`misses` must be 0).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import gammaln
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollguard.policy.checks import MIN_EVENTS, check_alpha, evaluate_checks, latency_threshold
from rollguard.policy.evidence import Evidence, VariantEvidence
from rollguard.policy.schema import Check, Spec
from rollguard.policy.sequential import difference_bounds, rate_bounds
from rollguard.policy.srm import SRM_CONCENTRATION, SRM_MIN_PER_ARM, SRM_PVALUE
from rollguard.policy.verdict import Verdict

CADENCES = (10, 100, 1000)
WINDOW = 2000  # per-variant ring buffer (the Rollout default)
LATENCY_MU, LATENCY_SIGMA = math.log(0.05), 0.5  # 50 ms median
LABEL_RATE, LABEL_DELAY, ACCURACY = 0.6, 1000.0, 0.90
AUDIT_LOOKS = 60  # unflagged looks per chunk re-run through evaluate_checks
Bools = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.int64]

DEFAULT_CHECKS = (
    Check(metric="error_rate", max_increase_vs_stable=0.005),
    Check(metric="latency_p99", max_ratio_to_stable=1.2),
    Check(metric="accuracy", max_drop_vs_stable=0.01),
    Check(metric="srm", on_fail="hold"),
)
STRICT_CHECKS = (  # margin 0: the test itself, right at its null
    Check(metric="error_rate", max_increase_vs_stable=0.0),
    Check(metric="accuracy", max_drop_vs_stable=0.0),
)
TIGHT_LATENCY = (Check(metric="latency_p99", max_ratio_to_stable=1.1),)


@dataclass(frozen=True)
class Scenario:
    name: str
    schedule: str  # "canary" | "fixed10"
    error: tuple[float, float]  # stable, candidate
    checks: tuple[Check, ...] = DEFAULT_CHECKS
    latency_scale: float = 1.0  # candidate latencies multiplied by this
    accuracy: tuple[float, float] = (ACCURACY, ACCURACY)
    horizon: int = 20_000

    @cached_property
    def weights(self) -> tuple[npt.NDArray[np.float64], Ints]:
        """Candidate percent per request, and the request index at which its step began."""
        return _weights(self)

    @property
    def aa(self) -> bool:
        regressed = self.latency_scale != 1.0 or self.accuracy[0] != self.accuracy[1]
        return self.error[0] == self.error[1] and not regressed


def _scenarios() -> list[Scenario]:
    out = [
        Scenario(f"aa_{sched}_err{p:g}", sched, (p, p))
        for sched in ("canary", "fixed10")
        for p in (0.001, 0.01, 0.05)
    ]
    out += [
        Scenario(f"aa_strict_canary_err{p:g}", "canary", (p, p), STRICT_CHECKS)
        for p in (0.001, 0.01, 0.05)
    ]
    out.append(Scenario("aa_tight_latency_canary", "canary", (0.01, 0.01), TIGHT_LATENCY))
    long = 50_000
    out += [
        Scenario("power_err_1to2", "canary", (0.01, 0.02), horizon=long),
        Scenario("power_latency_+50%", "canary", (0.01, 0.01), latency_scale=1.5, horizon=long),
        Scenario("power_latency_+20%", "canary", (0.01, 0.01), latency_scale=1.2, horizon=long),
        Scenario(
            "power_latency_+20%_tight", "canary", (0.01, 0.01), TIGHT_LATENCY, 1.2, horizon=long
        ),
        Scenario(
            "power_accuracy_-3pt", "canary", (0.01, 0.01), accuracy=(0.90, 0.87), horizon=long
        ),
    ]
    return out


def _spec(sc: Scenario) -> Spec:
    steps = [{"weight": 5}, {"weight": 25}, {"weight": 50}]
    return Spec.model_validate(
        {
            "model": "sim",
            "stable": "1",
            "candidate": "2",
            "key": "header:x-user",
            "steps": steps if sc.schedule == "canary" else [{"weight": 10}],
            "checks": [c.model_dump(exclude_unset=True) for c in sc.checks],
        }
    )


def _weights(sc: Scenario) -> tuple[npt.NDArray[np.float64], Ints]:
    h = sc.horizon
    if sc.schedule == "fixed10":
        return np.full(h, 10.0), np.zeros(h, np.int64)
    starts = np.array([0, h // 5, h // 2])
    step = np.searchsorted(starts, np.arange(h), side="right") - 1
    return np.array([5.0, 25.0, 50.0])[step], starts[step]


@dataclass
class Chunk:
    """One batch of replicates: cumulative counts at every look (one look per block)."""

    looks: Ints
    counts: dict[str, Ints]  # name -> (replicates, looks)
    threshold: npt.NDArray[np.float64]  # T per replicate
    freeze: Ints  # request index from which exceedances count (horizon: never)


def _stable_rows_needed(check: Check) -> int:
    """The fewest stable requests at which the real latency_threshold freezes T."""
    for k in range(1, WINDOW + 1):
        ev = VariantEvidence("s", requests=k, latencies=np.ones(min(k, WINDOW)))
        if latency_threshold(check, ev) is not None:
            return k
    raise ValueError(f"{check.metric} never freezes a threshold with a {WINDOW}-row window")


def _latencies(rng: np.random.Generator, size: int, scale: float) -> npt.NDArray[np.float64]:
    return scale * np.exp(LATENCY_MU + LATENCY_SIGMA * rng.standard_normal(size))


def _slow_share(threshold: npt.NDArray[np.float64], scale: float) -> npt.NDArray[np.float64]:
    """P(latency > T) for lognormal latencies multiplied by `scale`."""
    z = (np.log(threshold / scale) - LATENCY_MU) / LATENCY_SIGMA
    return np.asarray(norm.sf(z), dtype=np.float64)


def _before(per_block: Ints) -> Ints:
    """Cumulative counts before each block boundary: column b = blocks [0, b)."""
    zero = np.zeros((per_block.shape[0], 1), np.int64)
    return np.concatenate([zero, np.cumsum(per_block, axis=1, dtype=np.int64)], axis=1)


def _arrived(per_block: Ints, arrival: Ints) -> Ints:
    """Labels arrived by the end of each block, when block b's labels arrive at arrival[b]."""
    r, b = per_block.shape
    rows = np.broadcast_to(np.arange(r)[:, None], per_block.shape)
    keep = arrival < b
    hist = np.bincount(rows[keep] * b + arrival[keep], per_block[keep], minlength=r * b)
    return np.cumsum(hist.reshape(r, b), axis=1).astype(np.int64)


def _simulate(sc: Scenario, reps: int, rng: np.random.Generator) -> Chunk:
    """Counts per block of 10 requests (one look each), drawn as binomials.

    Exact in distribution for errors, routing and exceedances of the frozen T. A block's
    labels come back together after one exponential delay (batch labelling); latency
    windows are drawn afresh when a look is evaluated, since requests are independent.
    """
    h, size = sc.horizon, CADENCES[0]
    weight, step_start = sc.weights
    looks = np.arange(size, h + 1, size)
    blocks = looks.size
    w = weight[looks - 1][None, :] / 100
    c_n = rng.binomial(size, np.broadcast_to(w, (reps, blocks)))
    s_n = size - c_n
    c_lab, s_lab = rng.binomial(c_n, LABEL_RATE), rng.binomial(s_n, LABEL_RATE)
    arrival = np.arange(blocks) + np.ceil(rng.exponential(LABEL_DELAY / size, (reps, blocks)))
    arrival = arrival.astype(np.int64)
    c_before = _before(c_n)
    start_block = step_start[looks - 1] // size
    counts = {
        "c_req": c_before[:, 1:],
        "c_routed": c_before[:, 1:] - c_before[:, start_block],
        "c_err": np.cumsum(rng.binomial(c_n, sc.error[1]), axis=1),
        "s_err": np.cumsum(rng.binomial(s_n, sc.error[0]), axis=1),
        "c_lab": _arrived(c_lab, arrival),
        "s_lab": _arrived(s_lab, arrival),
        "c_cor": _arrived(rng.binomial(c_lab, sc.accuracy[1]), arrival),
        "s_cor": _arrived(rng.binomial(s_lab, sc.accuracy[0]), arrival),
    }
    counts["s_req"] = looks[None, :] - counts["c_req"]
    counts["s_routed"] = (looks - step_start[looks - 1])[None, :] - counts["c_routed"]
    threshold, freeze = np.full(reps, np.inf), np.full(reps, h, np.int64)
    lat_check = next((c for c in sc.checks if c.percentile is not None), None)
    if lat_check is not None:
        need = _stable_rows_needed(lat_check)
        for r in range(reps):
            j = int(np.argmax(counts["s_req"][r] >= need))
            n_s = int(counts["s_req"][r, j])
            window = _latencies(rng, min(n_s, WINDOW), 1.0)
            t = latency_threshold(lat_check, VariantEvidence("1", requests=n_s, latencies=window))
            assert t is not None, "the screen and latency_threshold disagree"
            threshold[r], freeze[r] = t, looks[j]
    after = looks[None, :] > freeze[:, None]  # block ends after the freeze: counted
    c_since, s_since = np.where(after, c_n, 0), np.where(after, s_n, 0)
    counts["c_since"] = np.cumsum(c_since, axis=1)
    counts["s_since"] = np.cumsum(s_since, axis=1)
    c_slow = _slow_share(threshold, sc.latency_scale)[:, None]
    s_slow = _slow_share(threshold, 1.0)[:, None]
    counts["c_over"] = np.cumsum(rng.binomial(c_since, np.broadcast_to(c_slow, c_n.shape)), axis=1)
    counts["s_over"] = np.cumsum(rng.binomial(s_since, np.broadcast_to(s_slow, s_n.shape)), axis=1)
    return Chunk(looks, counts, threshold, freeze)


def _screen(sc: Scenario, spec: Spec, ch: Chunk) -> tuple[Bools, Bools]:
    """Looks where a rollback (resp. hold) check's FAIL condition holds, vectorised."""
    n = ch.counts
    rollback, hold = (np.zeros_like(n["c_req"], dtype=bool) for _ in range(2))
    weight, _ = sc.weights
    for check in spec.checks:
        alpha = check_alpha(spec, check)
        if check.metric == "error_rate":
            m = check.fail_margin or 0.0  # FAIL is tested at fail_margin, not the margin
            _, lo, _, _ = difference_bounds(
                n["s_err"], n["s_req"], n["c_err"], n["c_req"], alpha, side="lower", null=m
            )
            enough = np.minimum(n["s_req"], n["c_req"]) >= check.min_samples
            flag = (lo > m - 1e-12) & enough & (n["c_err"] >= MIN_EVENTS)
        elif check.metric == "accuracy":
            m = check.fail_margin or 0.0
            _, lo, _, _ = difference_bounds(
                n["c_cor"], n["c_lab"], n["s_cor"], n["s_lab"], alpha, side="lower", null=m
            )
            enough = np.minimum(n["s_lab"], n["c_lab"]) >= check.min_samples
            flag = (lo > m - 1e-12) & enough & (n["c_lab"] - n["c_cor"] >= MIN_EVENTS)
        elif check.percentile is not None:
            allowed = 1 - check.percentile / 100
            _, lo, _, _ = rate_bounds(n["c_over"], n["c_since"], alpha, side="lower")
            enough = n["c_since"] >= check.min_samples
            flag = (lo > allowed - 1e-12) & enough & (n["c_over"] >= MIN_EVENTS)
        elif check.metric == "srm":
            # Weights 0 and 100 are never tested (too few expected); clipped to stay finite.
            w = np.clip(weight[ch.looks - 1][None, :] / 100, 1e-9, 1 - 1e-9)
            c, s = n["c_routed"], n["s_routed"]
            total = c + s
            k = SRM_CONCENTRATION  # policy.srm.sequential_srm_pvalue, two arms, vectorised
            log_bf = (
                gammaln(k)
                - gammaln(k * w)
                - gammaln(k * (1 - w))
                + gammaln(k * w + c)
                + gammaln(k * (1 - w) + s)
                - gammaln(k + total)
                - c * np.log(w)
                - s * np.log1p(-w)
            )
            flag = (log_bf > -np.log(SRM_PVALUE) * (1 + 1e-9)) & (
                total * np.minimum(w, 1 - w) >= SRM_MIN_PER_ARM
            )
        else:
            raise ValueError(f"the simulation does not model {check.metric!r}")
        (rollback if check.on_fail == "rollback" else hold)[...] |= flag
    return rollback, hold


def _evidence(sc: Scenario, ch: Chunk, r: int, j: int, rng: np.random.Generator) -> Evidence:
    n = {k: int(v[r, j]) for k, v in ch.counts.items()}
    end = int(ch.looks[j])
    frozen = end > ch.freeze[r]
    t = float(ch.threshold[r]) if frozen else None

    def side(v: str, p: str, scale: float) -> VariantEvidence:
        window = _latencies(rng, min(n[f"{p}_req"], WINDOW), scale)
        return VariantEvidence(
            v,
            requests=n[f"{p}_req"],
            errors=n[f"{p}_err"],
            routed=n[f"{p}_routed"],
            latency_threshold=t,
            since_threshold=n[f"{p}_since"] if frozen else 0,
            over_threshold=n[f"{p}_over"] if frozen else 0,
            labelled=n[f"{p}_lab"],
            correct=n[f"{p}_cor"],
            latencies=window,
        )

    stable, candidate = side("1", "s", 1.0), side("2", "c", sc.latency_scale)
    return Evidence(stable, candidate, float(sc.weights[0][end - 1]))


def _kinds(spec: Spec, ev: Evidence) -> tuple[bool, bool]:
    """(some rollback check FAILs, some hold check FAILs) per the real evaluate_checks."""
    failed = [r.check.on_fail for r in evaluate_checks(spec, ev) if r.verdict is Verdict.FAIL]
    return "rollback" in failed, "hold" in failed


@dataclass
class Tally:
    replicates: int = 0
    # "rollback@100" -> candidate requests at each replicate's first FAIL on that cadence
    first: dict[str, list[int]] = field(default_factory=dict)
    naive: dict[int, int] = field(default_factory=dict)  # cadence -> replicates ever rejected
    audited: int = 0
    misses: int = 0


def _confirm(sc: Scenario, spec: Spec, ch: Chunk, tally: Tally, rng: np.random.Generator) -> None:
    """Run evaluate_checks at flagged looks, in order, until each cadence's first FAIL."""
    rollback, hold = _screen(sc, spec, ch)
    for kind, flags in (("rollback", rollback), ("hold", hold)):
        for r in np.flatnonzero(flags.any(axis=1)):
            open_cadences = list(CADENCES)
            for j in np.flatnonzero(flags[r]):
                due = [c for c in open_cadences if ch.looks[j] % c == 0]
                if not due:
                    continue
                if _kinds(spec, _evidence(sc, ch, int(r), int(j), rng))[kind == "hold"]:
                    for c in due:
                        first = tally.first.setdefault(f"{kind}@{c}", [])
                        first.append(int(ch.counts["c_req"][r, j]))
                        open_cadences.remove(c)
                if not open_cadences:
                    break
    quiet = np.argwhere(~rollback & ~hold)
    for r, j in quiet[rng.choice(len(quiet), min(AUDIT_LOOKS, len(quiet)), replace=False)]:
        tally.audited += 1
        tally.misses += any(_kinds(spec, _evidence(sc, ch, int(r), int(j), rng)))
    _naive(ch, tally)


def _naive(ch: Chunk, tally: Tally) -> None:
    """The contrast: a fixed-horizon one-sided z-test (α = 0.05) on error rates, peeked at."""
    n = ch.counts
    pooled = (n["s_err"] + n["c_err"]) / ch.looks[None, :]
    se = np.sqrt(
        pooled * (1 - pooled) * (1 / np.maximum(n["s_req"], 1) + 1 / np.maximum(n["c_req"], 1))
    )
    diff = n["c_err"] / np.maximum(n["c_req"], 1) - n["s_err"] / np.maximum(n["s_req"], 1)
    z = np.divide(diff, se, out=np.zeros_like(diff), where=se > 0)
    rejects = (z > norm.isf(0.05)) & (np.minimum(n["s_req"], n["c_req"]) >= 200)
    for c in CADENCES:
        tally.naive[c] = tally.naive.get(c, 0) + int(
            rejects[:, ch.looks % c == 0].any(axis=1).sum()
        )


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def run_scenario(sc: Scenario, replicates: int, seed: int = 0) -> dict[str, Any]:
    """Simulate `replicates` rollouts of one scenario; counts per kind and cadence."""
    spec = _spec(sc)
    rng = np.random.default_rng([seed, sum(map(ord, sc.name))])
    chunk = max(1, 20_000_000 // sc.horizon)  # about 2 M blocks of 10 requests at once
    tally, started = Tally(), time.perf_counter()
    for begin in range(0, replicates, chunk):
        size = min(chunk, replicates - begin)
        _confirm(sc, spec, _simulate(sc, size, rng), tally, rng)
        tally.replicates += size
    rows = []
    for kind in ("rollback", "hold"):
        for c in CADENCES:
            cand = tally.first.get(f"{kind}@{c}", [])
            k = len(cand)
            lo, hi = wilson(k, tally.replicates)
            rows.append(
                {
                    "kind": kind,
                    "cadence": c,
                    "replicates": tally.replicates,
                    "fails": k,
                    "rate": k / tally.replicates,
                    "wilson_low": lo,
                    "wilson_high": hi,
                    "median_candidate_requests": float(np.median(cand)) if cand else None,
                    "naive_z_fails": tally.naive.get(c) if kind == "rollback" else None,
                }
            )
    return {
        "scenario": sc.name,
        "aa": sc.aa,
        "schedule": sc.schedule,
        "error": list(sc.error),
        "latency_scale": sc.latency_scale,
        "accuracy": list(sc.accuracy),
        "horizon": sc.horizon,
        "alpha": spec.alpha,
        "checks": [c.model_dump(exclude_unset=True) for c in sc.checks],
        "audited_looks": tally.audited,
        "misses": tally.misses,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    """The A/A and power tables."""
    out = [
        "### A/A: replicates that ever FAIL (both arms identical)\n",
        "| scenario | looks every | reps | rollbacks | rate | Wilson 95% | ≤ α | SRM holds"
        " | naive z-test |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in (r for r in results if r["aa"]):
        holds = {row["cadence"]: row for row in res["rows"] if row["kind"] == "hold"}
        for row in (r for r in res["rows"] if r["kind"] == "rollback"):
            h = holds[row["cadence"]]
            out.append(
                f"| {res['scenario']} | {row['cadence']} | {row['replicates']} | {row['fails']}"
                f" | {row['rate']:.4f} | [{row['wilson_low']:.4f}, {row['wilson_high']:.4f}]"
                f" | {'yes' if row['wilson_high'] <= res['alpha'] else 'NO'} | {h['fails']}"
                f" | {row['naive_z_fails'] / row['replicates']:.3f} |"
            )
    out += [
        "\n### Power: injected regressions (canary 5 → 25 → 50 %)\n",
        "| scenario | horizon | looks every | reps | detected | share | median candidate"
        " requests to FAIL |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in (r for r in results if not r["aa"]):
        for row in (r for r in res["rows"] if r["kind"] == "rollback"):
            med = row["median_candidate_requests"]
            out.append(
                f"| {res['scenario']} | {res['horizon']} | {row['cadence']} | {row['replicates']}"
                f" | {row['fails']} | {row['rate']:.3f} | {'-' if med is None else f'{med:.0f}'} |"
            )
    audited = sum(r["audited_looks"] for r in results)
    misses = sum(r["misses"] for r in results)
    out.append(
        f"\nScreen audit: {audited} unflagged looks re-run through evaluate_checks,"
        f" {misses} FAILs missed."
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--replicates", type=int, default=None, help="per scenario (default 2000 A/A, 1000 power)"
    )
    parser.add_argument("--quick", action="store_true", help="300 replicates, < 30 s")
    parser.add_argument("--scenario", action="append", default=[], help="name (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON")
    args = parser.parse_args(argv)
    scenarios = _scenarios()
    if args.scenario:
        known = {s.name for s in scenarios}
        if unknown := set(args.scenario) - known:
            parser.error(f"unknown scenario {sorted(unknown)}; known: {sorted(known)}")
        scenarios = [s for s in scenarios if s.name in args.scenario]
    elif args.quick:
        scenarios = [s for s in scenarios if s.name in ("aa_canary_err0.01", "power_err_1to2")]
    results = []
    for sc in scenarios:
        replicates = args.replicates or (300 if args.quick else 2000 if sc.aa else 1000)
        results.append(run_scenario(sc, replicates, args.seed))
        print(f"{sc.name}: {results[-1]['seconds']:.1f} s", file=sys.stderr)
    print(markdown(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
