"""`rollguard demo`: a real registry, a real gateway, real traffic, two rollouts to watch.

Builds the demo registry (scikit-learn, ONNX and PyTorch models trained on the
breast-cancer data scikit-learn ships), starts `rollguard serve` on loopback with the
shipped config and demo policies, drives sticky-user traffic with delayed ground-truth
labels, and shows a faulty candidate rolled back, then a good one promoted.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from rollguard.proxy.process import GatewayProcess, free_port

CONFIG = Path(__file__).resolve().parent.parent / "config"
ACTS = (
    (
        "a faulty candidate (fraud 1.2.0 fails ~5% of requests)",
        CONFIG / "examples" / "canary-faulty.yaml",
        "rolled_back",
    ),
    ("a good candidate (fraud 1.1.0)", CONFIG / "policies" / "fraud-canary.yaml", "promoted"),
)
ACT_DEADLINE_S = 45.0
# Steady traffic well below what 2 cores serve (~850 req/s with labels), as a sidecar
# sees in production: a saturated gateway queues, and then a version's latency says how
# much of the traffic it gets (a busy version's threads hold the interpreter lock and
# run its calls back to back; a quiet version's wait for it), not how fast its model is.
RATE_PER_S = 300.0
CLIENTS = 8


@dataclass
class _Tally:
    """Client-side view of the traffic: per-variant counts, failures and latencies."""

    requests: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def add(self, variant: str, ok: bool, latency: float) -> None:
        self.requests[variant] = self.requests.get(variant, 0) + 1
        self.failures[variant] = self.failures.get(variant, 0) + (not ok)
        self.latencies.setdefault(variant, []).append(latency)


async def _rollout(http: aiohttp.ClientSession, gw: GatewayProcess) -> dict[str, Any] | None:
    async with http.get(f"{gw.admin_url}/admin/rollouts/fraud", headers=gw.admin_headers) as r:
        return await r.json() if r.status == 200 else None


def _progress(doc: dict[str, Any], tally: _Tally, elapsed: float) -> str:
    parts = []
    for role in ("stable", "candidate"):
        v = doc.get("variants", {}).get(role, {})
        p99 = v.get("latency_p99")
        acc = v.get("accuracy")
        parts.append(
            f"{role} {doc[role]}: {v.get('requests', 0):>5} req "
            f"err {100 * (v.get('error_rate') or 0):4.1f}% "
            f"p99 {1000 * p99 if p99 is not None else float('nan'):6.1f}ms "
            f"acc {100 * acc if acc is not None else float('nan'):5.1f}%"
        )
    return (
        f"[{elapsed:5.1f}s] {doc['phase']:<12} step {doc['step'] + 1}/{doc['steps']} "
        f"weight {doc['weight']:5.1f}% | " + " | ".join(parts)
    )


def _install_policy(policy: Path, target: Path) -> None:
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(policy.read_bytes())
    tmp.replace(target)  # atomic, as a ConfigMap update would be


async def _act(
    http: aiohttp.ClientSession,
    gw: GatewayProcess,
    workdir: Path,
    title: str,
    policy: Path,
    goal: str,
    tally: _Tally,
) -> bool:
    from rollguard.serving.demo.build import load_eval_data

    print(f"\n== {title}: policy {policy.relative_to(CONFIG.parent)}")
    _install_policy(policy, workdir / "policies" / "fraud.yaml")
    x, y = load_eval_data()
    rng = np.random.default_rng(7)
    start = time.monotonic()
    done = asyncio.Event()
    counter = 0

    async def client(worker: int) -> None:
        nonlocal counter
        # Each client sends every CLIENTS / RATE_PER_S seconds, staggered so that the
        # requests arrive evenly rather than in bursts; one that falls behind does not
        # catch up in a burst either.
        period = CLIENTS / RATE_PER_S
        due = time.monotonic() + worker * period / CLIENTS
        while not done.is_set():
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            due = max(due + period, time.monotonic())
            counter += 1
            i = counter
            row = int(rng.integers(len(x)))
            body = {"features": x[row].tolist(), "id": f"demo-{goal}-{i}"}
            headers = {"x-user-id": f"user-{rng.integers(5000)}"}
            t0 = time.perf_counter()
            async with http.post(f"{gw.url}/predict/fraud", json=body, headers=headers) as r:
                await r.read()
                variant = r.headers.get("x-rollguard-variant", "?")
                tally.add(variant, r.status == 200, time.perf_counter() - t0)
            if r.status == 200:
                async with http.post(
                    f"{gw.url}/v2/models/fraud/feedback",
                    json={"id": body["id"], "label": int(y[row])},
                ) as fr:
                    await fr.read()

    workers = [asyncio.create_task(client(w)) for w in range(CLIENTS)]
    reached = False
    last_line = ""
    try:
        while time.monotonic() - start < ACT_DEADLINE_S:
            await asyncio.sleep(1.0)
            doc = await _rollout(http, gw)
            if doc is None or doc.get("candidate") != _candidate(policy):
                continue
            line = _progress(doc, tally, time.monotonic() - start)
            if line != last_line:
                print(line, flush=True)
                last_line = line
            if doc["phase"] == goal:
                reached = True
                print(f"-> {goal.replace('_', ' ')}: {doc['reason']}")
                break
    finally:
        done.set()
        await asyncio.gather(*workers, return_exceptions=True)
    if not reached:
        print(f"-> did not reach '{goal}' within {ACT_DEADLINE_S:.0f}s", file=sys.stderr)
    return reached


def _candidate(policy: Path) -> str:
    from rollguard.policy.loader import load_rollout

    return load_rollout(policy).spec.candidate


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


async def _summary(http: aiohttp.ClientSession, gw: GatewayProcess, tally: _Tally) -> None:
    print("\n== summary (client side, all acts)")
    print(f"{'version':<8} {'requests':>8} {'errors':>7} {'p50 ms':>7} {'p99 ms':>7}")
    for variant in sorted(tally.requests):
        n = tally.requests[variant]
        lat = tally.latencies[variant]
        print(
            f"{variant:<8} {n:>8} {100 * tally.failures[variant] / n:>6.2f}% "
            f"{_percentile(lat, 50):>7.2f} {_percentile(lat, 99):>7.2f}"
        )
    doc = await _rollout(http, gw)
    if doc is not None:
        print("\n== gateway windows (last rollout, recent requests)")
        for role in ("stable", "candidate"):
            v = doc["variants"][role]
            acc = v.get("accuracy")
            print(
                f"{role:<9} {doc[role]:<6} requests {v['requests']:>5}  "
                f"error rate {100 * v['error_rate']:.2f}%  accuracy "
                + (f"{100 * acc:.1f}%" if acc is not None else "n/a")
            )
    async with http.get(f"{gw.admin_url}/admin/audit", headers=gw.admin_headers) as r:
        entries = (await r.json())["entries"]
    print("\n== decisions (from the hash-chained audit log)")
    for e in entries:
        data = e.get("data", {})
        if e["kind"] in ("decision", "start", "admin"):
            action = data.get("action", e["kind"])
            print(f"{e['ts'][11:19]} {e['rollout']:<6} {action:<9} {data.get('reason', '')}")


async def _run(workdir: Path, port: int) -> int:
    gw = GatewayProcess(
        registry=workdir / "registry",
        policies=workdir / "policies",
        state=workdir / "state",
        log=workdir / "gateway.log",
        port=port,
        env={
            **{k: v for k, v in os.environ.items() if k != "ROLLGUARD_ADMIN_AUTH"},
            "ROLLGUARD_POLICY_POLL_S": "0.5",
            # Admin with a token, as in production: a fresh one for this run only.
            "ROLLGUARD_ADMIN_TOKEN": secrets.token_urlsafe(32),
        },
    )
    tally = _Tally()
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=16), timeout=aiohttp.ClientTimeout(total=30)
        ) as http:
            await gw.wait_ready(http)
            print(f"gateway ready at {gw.url}, admin at {gw.admin_url} (log: {gw.log})")
            print(
                f"traffic: {RATE_PER_S:.0f} requests/s from {CLIENTS} clients, 5,000 sticky "
                "users, each answer labelled"
            )
            results = [
                await _act(http, gw, workdir, title, policy, goal, tally)
                for title, policy, goal in ACTS
            ]
            await _summary(http, gw, tally)
    finally:
        gw.stop()
    from rollguard.policy.audit import verify

    check = verify(workdir / "state" / "audit.jsonl")
    print(
        f"\naudit log: {check.entries} entries, "
        + ("chain intact" if check.ok else f"BROKEN: {check.reason}")
    )
    return 0 if all(results) and check.ok else 1


def run_demo(*, workdir: Path, port: int = 0) -> int:
    """Run the whole demo; 0 when the bad candidate was rolled back and the good one promoted."""
    import logging

    from rollguard.serving.demo.build import build_demo_registry

    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    workdir = workdir.resolve()
    print(f"building the demo registry in {workdir / 'registry'} (real models, trained now)...")
    build_demo_registry(workdir / "registry")
    # Each run starts a fresh rollout history; the registry is kept for the next run.
    for sub in ("state", "policies"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    (workdir / "policies").mkdir(parents=True)
    code = asyncio.run(_run(workdir, port or free_port()))
    print(
        f"demo finished in {time.monotonic() - started:.0f}s: " + ("ok" if code == 0 else "FAILED")
    )
    return code
