"""A/A latency check of two in-process scikit-learn versions: does the candidate look
slower only because it gets less of the traffic?

    python -m load_tests.latency_bias --runs 3 --rate 0      # 8 clients in a closed loop
    python -m load_tests.latency_bias --runs 3 --rate 300    # steady 300 req/s

Each run starts the real gateway (`rollguard serve`) on the demo registry's fraud 1.0.0
and 1.1.0 (two logistic regressions of the same cost) in a canary held at `--weight`
percent with only a `latency_p99` check (on_fail: alert, so nothing moves), sends
`--seconds` of sticky-user traffic from 8 clients, and reads the check from the admin
API: how often each arm was slower than the stable's frozen p99 and the verdict. With a
closed loop the 2 cores saturate; docs/decisions.md ("Not at saturation") explains the
bias that shows. Appends a table to load_tests/results/latency_bias.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from load_tests.demo_repeat import current_commit
from rollguard.proxy.process import GatewayProcess
from rollguard.serving.demo.build import build_demo_registry, load_eval_data

RESULTS = Path(__file__).resolve().parent / "results" / "latency_bias.md"
CLIENTS = 8

POLICY = """apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: fraud}}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "1.1.0"
  strategy: canary
  split: hash
  key: header:x-user-id
  steps:
    - {{weight: {weight}, hold: 1h, min_requests: 100}}
    - {{weight: 100}}
  window: 2000
  interval: 1s
  checks:
    - {{metric: latency_p99, max_ratio_to_stable: 1.5, min_samples: 300,
       pass_when: no_fail, on_fail: alert}}
"""


async def _drive(gw: GatewayProcess, rate: float, seconds: float, seed: int) -> int:
    """Sticky-user traffic for `seconds`: a closed loop (`rate` 0) or `rate` req/s from
    staggered clients that never catch up in bursts; the requests answered."""
    x, _ = load_eval_data()
    rng = np.random.default_rng(seed)
    answered = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as http:
        await gw.wait_ready(http)
        end = time.monotonic() + seconds

        async def client(i: int) -> None:
            nonlocal answered
            period = CLIENTS / rate if rate else 0.0
            due = time.monotonic() + i * period / CLIENTS
            while time.monotonic() < end:
                if period:
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    due = max(due + period, time.monotonic())
                row = x[int(rng.integers(len(x)))].tolist()
                headers = {"x-user-id": f"user-{rng.integers(5000)}"}
                url = f"{gw.url}/predict/fraud"
                async with http.post(url, json={"features": row}, headers=headers) as r:
                    await r.read()
                    answered += r.status == 200

        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    return answered


async def _check(gw: GatewayProcess) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gw.admin_url}/admin/rollouts/fraud", headers=gw.admin_headers) as r,
    ):
        doc = await r.json()
    for check in (doc.get("last_decision") or {}).get("checks", []):
        if check["metric"] == "latency_p99":
            return {"verdict": check["verdict"], **check["detail"]}
    return {"verdict": "none"}


def run_once(
    work: Path, registry: Path, rate: float, weight: float, seconds: float
) -> dict[str, Any]:
    policies, state = work / "policies", work / "state"
    policies.mkdir(parents=True)
    (policies / "fraud.yaml").write_text(POLICY.format(weight=weight), encoding="utf-8")
    gw = GatewayProcess(
        registry=registry,
        policies=policies,
        state=state,
        log=work / "gateway.log",
        env={**os.environ, "ROLLGUARD_ADMIN_TOKEN": secrets.token_urlsafe(16)},
    )
    try:
        answered = asyncio.run(_drive(gw, rate, seconds, seed=time.time_ns() % 2**32))
        found = asyncio.run(_check(gw))
    finally:
        gw.stop()
    return {"answered": answered, **found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=0.0, help="req/s; 0: a closed loop")
    parser.add_argument("--weight", type=float, default=25.0, help="candidate percent")
    parser.add_argument("--seconds", type=float, default=25.0, help="traffic per run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rollguard-latency-bias-") as scratch:
        registry = Path(scratch) / "registry"
        build_demo_registry(registry, frameworks=("sklearn",))
        for run in range(1, args.runs + 1):
            found = run_once(Path(scratch) / f"run{run}", registry, args.rate, args.weight,
                             args.seconds)  # fmt: skip
            rows.append(found)
            print(f"run {run}/{args.runs}: {found['verdict']}, ratio {found.get('ratio')}")
    load = f"{args.rate:g} req/s, steady" if args.rate else f"{CLIENTS} clients, closed loop"
    lines = [
        f"## {load}, candidate at {args.weight:g} %",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {current_commit()}, "
        f"{os.cpu_count()} cores, "
        f"{args.seconds:g} s a run. Slower than T: requests slower than the stable's p99 "
        "frozen as T, over those counted since; ratio: the candidate's rate over the "
        "stable's (1 when neither is slower); CI: the always-valid bounds FAIL rests on.",
        "",
        "| run | answered | verdict | T ms | stable slower than T | candidate slower than T "
        "| ratio | CI |",
        "|---:|---:|---|---:|---|---|---:|---|",
    ]
    for i, r in enumerate(rows, 1):
        t = r.get("threshold_s")
        lo, hi = r.get("ci_lower"), r.get("ci_upper")
        lines.append(
            f"| {i} | {r['answered']} | {r['verdict']} | {1000 * t if t else float('nan'):.1f} "
            f"| {r.get('events_stable')} of {r.get('n_stable')} "
            f"| {r.get('events_candidate')} of {r.get('n_candidate')} "
            f"| {r.get('ratio') or float('nan'):.2f} "
            f"| {lo if lo is None else round(lo, 2)}–{hi if hi is None else round(hi, 2)} |"
        )
    header = "# A/A latency check of two in-process versions (load_tests/latency_bias.py)\n"
    previous = (
        args.out.read_text(encoding="utf-8").rstrip("\n") + "\n" if args.out.exists() else header
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(previous + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"table appended to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
