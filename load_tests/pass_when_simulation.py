"""Which `pass_when` should be the default? Promotions of a 2x regression, and how long a
healthy candidate takes, under the real lifecycle (policy/lifecycle.py tick every 5 s).

Run `python load_tests/pass_when_simulation.py [--replicates N]`. The README's example
schedule (10 % for 60 s and 500 requests, 50 % for 120 s, then 100 %), one error_rate
check (`max_increase_vs_stable: 0.005`, alpha 0.05), stable errors 1 %, candidate 1 %
(healthy) or 2 % (a 2x regression), at 100 req/s and at 50 req/min. Each tick serves the
interval's requests (every 5 s; at 50 req/min every 5 min) split by the routed weight
(Binomial), counted per weight as the windows count them, and hands the evidence to
lifecycle.tick. A rollout ends promoted, rolled back, or still running at the horizon
(48 h of traffic).

Modes: `bound` (PASS once the always-valid bound rules out harm beyond the margin),
`no_fail` with the default min_samples (200) and `no_fail` with min_samples sized from
the conditional test's detection distribution for 1 % -> 2 % at a 5-10 % weight
(load_tests/conditional_power.py: p90 about 2,600 candidate requests; 4,000 here).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollguard.policy import lifecycle
from rollguard.policy.evidence import Evidence, VariantEvidence
from rollguard.policy.schema import Rollout
from rollguard.policy.state import Phase

INTERVAL = 5.0
HORIZON_S = 48 * 3600.0
MODES: dict[str, dict[str, Any]] = {
    "bound": {},
    "no_fail_200": {"pass_when": "no_fail"},
    "no_fail_4000": {"pass_when": "no_fail", "min_samples": 4000},
}


def _rollout(mode: str) -> Rollout:
    check = {"metric": "error_rate", "max_increase_vs_stable": 0.005} | MODES[mode]
    spec = {
        "model": "m", "stable": "1", "candidate": "2", "key": "header:u",
        "steps": [{"weight": 10, "hold": "60s", "min_requests": 500},
                  {"weight": 50, "hold": "120s"}, {"weight": 100}],
        "interval": "5s", "checks": [check],
    }  # fmt: skip
    document = {"apiVersion": "rollguard/v1", "kind": "Rollout", "metadata": {"name": "r"}}
    return Rollout.model_validate(document | {"spec": spec})


def run_one(mode: str, rate: float, p_cand: float, rng: np.random.Generator) -> tuple[str, float]:
    """(outcome, seconds) of one rollout; outcome promoted, rolled_back or running."""
    rollout = _rollout(mode)
    t0 = 1_700_000_000.0
    state = lifecycle.begin(rollout, t0).state
    counts: dict[float, list[int]] = {}  # weight -> stable req, err, candidate req, err
    carry = 0.0
    now = 0.0
    # Slow traffic is looked at every 250 requests rather than every 5 s (same verdicts,
    # fewer looks: the simulation stays minutes long).
    interval = max(INTERVAL, 250 / rate)
    while now < HORIZON_S:
        now += interval
        carry += rate * interval
        n = int(carry)
        carry -= n
        w = state.weight
        row = counts.setdefault(w, [0, 0, 0, 0])
        n_c = int(rng.binomial(n, w / 100.0))
        row[0] += n - n_c
        row[1] += int(rng.binomial(n - n_c, 0.01))
        row[2] += n_c
        row[3] += int(rng.binomial(n_c, p_cand))
        stable = VariantEvidence(
            "1", requests=sum(r[0] for r in counts.values()),
            errors=sum(r[1] for r in counts.values()),
            strata=tuple((k, r[0], r[1], 0, 0, r[1], 0) for k, r in sorted(counts.items()) if r[0]),
        )  # fmt: skip
        candidate = VariantEvidence(
            "2", requests=sum(r[2] for r in counts.values()),
            errors=sum(r[3] for r in counts.values()),
            strata=tuple((k, r[2], r[3], 0, 0, r[3], 0) for k, r in sorted(counts.items()) if r[2]),
        )  # fmt: skip
        state = lifecycle.tick(rollout, state, Evidence(stable, candidate, w), t0 + now).state
        if state.phase in (Phase.PROMOTED, Phase.ROLLED_BACK):
            return state.phase.value, now
    return "running", now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=100)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    args = parser.parse_args()
    for rate, label in ((100.0, "100 req/s"), (50 / 60, "50 req/min")):
        for p_cand, kind in ((0.02, "2x regression"), (0.01, "healthy")):
            for mode in args.modes:
                rng = np.random.default_rng(args.seed)
                runs = [run_one(mode, rate, p_cand, rng) for _ in range(args.replicates)]
                promoted = [t for o, t in runs if o == "promoted"]
                rolled = sum(o == "rolled_back" for o, _ in runs)
                running = sum(o == "running" for o, _ in runs)
                med = np.median(promoted) / 3600 if promoted else math.nan
                print(
                    f"{label:10s} {kind:13s} {mode:13s} promoted {len(promoted):3d} "
                    f"rolled back {rolled:3d} still running at 48 h {running:3d} of "
                    f"{len(runs)}; median time to promote {med:.2f} h"
                )
                sys.stdout.flush()


if __name__ == "__main__":
    main()
