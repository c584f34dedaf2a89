"""Sticky users: false FAILs and power of the conditional test per request vs per key.

Run `python load_tests/conditional_sticky.py SEED aa|power`. Users with Zipf activity
and Gamma-distributed error rates (mean 1 %; shape 0.5 is very uneven, 100 nearly
even) are assigned to the candidate by a uniform hash below the weight, as the sticky
split does. Every `every` requests the error strata are built two ways and handed to
policy.conditional.log_evalue, the statistic the error check FAILs on (at 1/alpha, with
at least 5 candidate events):
- "event": every error at the candidate's realised share of the requests;
- "key": each user's first error at the configured weight (what the windows count
  with a hash split, policy/checks.py `_strata(units=True)`).
A/A: weight 5 → 25 → 50 %, 60,000 requests, 100 replicates; power: errors doubled on
the candidate, weight 5 %, 120,000 requests, 30 replicates.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollguard.policy.conditional import Stratum, log_evalue

ALPHA = 0.05 / 3


def run(
    rng: np.random.Generator,
    *,
    users: int = 20_000,
    n: int = 60_000,
    zipf: float = 1.3,
    shape: float = 0.5,
    weights: tuple[float, ...] = (5.0, 25.0, 50.0),
    every: int = 500,
    ratio: float = 1.0,
) -> dict[str, int]:
    """Candidate requests at the first FAIL of each way of counting (absent: none)."""
    activity = rng.zipf(zipf, users).clip(1, 10**6).astype(float)
    activity /= activity.sum()
    rate = rng.gamma(shape, 0.01 / shape, users)
    position = rng.random(users)  # the user's hash bucket, uniform
    who = rng.choice(users, size=n, p=activity)
    t = np.arange(n) / n
    weight = np.asarray(weights)[np.minimum((t * len(weights)).astype(int), len(weights) - 1)]
    cand = position[who] < weight / 100
    err = rng.random(n) < np.clip(rate[who] * np.where(cand, ratio, 1.0), 0, 1)
    first = np.zeros(n, dtype=bool)
    seen: set[int] = set()
    for i in np.flatnonzero(err):
        if who[i] not in seen:
            seen.add(int(who[i]))
            first[i] = True
    found: dict[str, int] = {}
    for name, events in (("event", err), ("key", first)):
        for end in range(every, n + 1, every):
            strata = []
            for w in np.unique(weight[:end]):
                m = weight[:end] == w
                c, s = cand[:end] & m, ~cand[:end] & m
                xs, xc = int((events[:end] & s).sum()), int((events[:end] & c).sum())
                if name == "event":
                    strata.append(Stratum(xs, int(s.sum()), xc, int(c.sum())))
                else:
                    strata.append(Stratum(xs, round(100 * (100 - w)), xc, round(100 * w)))
            enough = sum(x.candidate_events for x in strata) >= 5
            if enough and log_evalue(strata, 1.0) >= math.log(1 / ALPHA):
                found[name] = int(cand[:end].sum())
                break
    return found


def main() -> None:
    rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    mode = sys.argv[2] if len(sys.argv) > 2 else "aa"
    for shape, zipf in ((0.5, 1.5), (0.5, 1.2), (100.0, 1.2), (100.0, 3.0)):
        if mode == "aa":
            res = [run(rng, shape=shape, zipf=zipf) for _ in range(100)]
            counts = {k: sum(k in r for r in res) for k in ("event", "key")}
            print(f"A/A shape {shape} zipf {zipf}: false FAIL per event {counts['event']}/100, "
                  f"per key {counts['key']}/100", flush=True)  # fmt: skip
        else:
            res = [
                run(rng, shape=shape, zipf=zipf, ratio=2.0, weights=(5.0,), n=120_000, every=1000)
                for _ in range(30)
            ]
            for name in ("event", "key"):
                hits = [r[name] for r in res if name in r]
                med = float(np.median(hits)) if hits else math.nan
                what = f"1 % -> 2 %, weight 5 %, shape {shape} zipf {zipf}, per {name}"
                print(f"{what}: caught {len(hits)}/30, median {med:.0f} candidate requests")


if __name__ == "__main__":
    main()
