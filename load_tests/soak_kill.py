"""SIGKILL soak: kill a real `rollguard serve` at random points, restart it, check the records.

    python -m load_tests.soak_kill --cycles 100 [--seed 1] [--registry DIR] [--output FILE]

Each cycle starts the gateway (a child process on loopback, an admin token and an audit
key in its environment) over one state directory kept across cycles, then, at a random
moment, SIGKILLs it: during start-up (before it is ready: audit repair, state recovery)
or while clients send predictions and labels, the rollout makes automatic decisions,
an operator acts (pause, resume, rollback, promote, approve) and the policy file is
rewritten (a new candidate, 1.1.0 good or 1.2.0 faulty, or new holds). After every
restart, with the gateway frozen (SIGSTOP) so that the files hold still, it checks:

- `rollguard audit verify` (the real CLI, with the key) exits 0;
- every state file agrees with the log (policy/recovery.py's rule: its `audit_seq` is
  the rollout's last record and its outcome is that record's, or it was saved just
  before the kill and its record is the next entry);
- a terminal outcome seen before the kill (rolled back, promoted) is still the outcome
  after the restart, for the same generation: no decision lost.

It writes a table to load_tests/results/soak_kill.md; exit status 0 when every check held.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from rollguard.policy.chain import walk_file
from rollguard.policy.keys import AuditKey
from rollguard.policy.recovery import OUTCOME
from rollguard.policy.store import StateStore
from rollguard.proxy.process import GatewayProcess

RESULTS = Path(__file__).resolve().parent / "results" / "soak_kill.md"
TOKEN = "soak-admin-token-0123456789abcdef"  # 33 characters
KEY = "soak-audit-key-0123456789abcdef-0123456789"
NAME = "fraud"
ACTIONS = ("pause", "resume", "rollback", "promote", "approve")
POLICY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {{name: {name}}}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "{candidate}"
  strategy: canary
  split: hash
  key: header:x-user-id
  steps:
    - {{weight: 20, hold: {hold}s, min_requests: 15}}
    - {{weight: 50, hold: {hold}s, min_requests: 15}}
    - {{weight: 100, hold: {hold}s, min_requests: 15}}
  interval: 0.2s
  require_approval: {approval}
  checks:
    - {{metric: error_rate, max_increase_vs_stable: 0.05, min_samples: 15, on_fail: rollback}}
    - {{metric: accuracy, max_drop_vs_stable: 0.1, min_samples: 15, on_fail: rollback}}
"""


@dataclass
class Cycle:
    n: int
    killed_at: str = ""  # "start-up" or "running"
    run_s: float = 0.0
    requests: int = 0
    answered: int = 0  # 200s
    actions: int = 0
    reloads: int = 0
    before: str = ""  # generation/phase seen last before the kill
    after: str = ""  # after the restart
    ready_s: float = 0.0  # restart to ready
    entries: int = 0
    verify: str = ""
    agreement: str = ""
    kept: str = ""
    problems: list[str] = field(default_factory=list)


def write_policy(policies: Path, rng: random.Random) -> None:
    """Rewrite the policy atomically: maybe a new candidate, new holds, approval or not."""
    text = POLICY.format(
        name=NAME,
        candidate=rng.choice(["1.1.0", "1.1.0", "1.2.0"]),
        hold=rng.choice([0.3, 0.6, 1.0]),
        approval=rng.choice(["false", "false", "true"]),
    )
    tmp = policies / f".{NAME}.yaml.tmp"
    tmp.write_text(text)
    os.replace(tmp, policies / f"{NAME}.yaml")


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("ROLLGUARD_")}
    out |= {
        "ROLLGUARD_ADMIN_TOKEN": TOKEN,
        "ROLLGUARD_AUDIT_KEY": KEY,
        "ROLLGUARD_LOG_LEVEL": "WARNING",
        "ROLLGUARD_POLICY_POLL_S": "0.1",
    }
    return out


async def ready(gateway: GatewayProcess, http: aiohttp.ClientSession, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if gateway.proc.poll() is not None:
            return False
        try:
            async with http.get(f"{gateway.url}/v2/health/ready") as r:
                if r.status == 200:
                    return True
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    return False


async def rollout(gateway: GatewayProcess, http: aiohttp.ClientSession) -> dict[str, Any] | None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with http.get(f"{gateway.admin_url}/admin/rollouts/{NAME}", headers=headers) as r:
            return dict(await r.json()) if r.status == 200 else None
    except aiohttp.ClientError:
        return None


async def drive(
    gateway: GatewayProcess,
    http: aiohttp.ClientSession,
    rng: random.Random,
    rows: list[tuple[list[float], int]],
    policies: Path,
    cycle: Cycle,
    seconds: float,
) -> None:
    """Traffic with labels from 4 clients, and operator actions and policy reloads."""
    stop = time.monotonic() + seconds

    async def client(w: int) -> None:
        i = w
        while time.monotonic() < stop:
            features, label = rows[i % len(rows)]
            rid = f"c{cycle.n}-{w}-{i}"
            headers = {"x-user-id": f"user-{rng.randrange(10**6)}", "x-request-id": rid}
            try:
                url = f"{gateway.url}/predict/fraud"
                async with http.post(url, json={"features": features}, headers=headers) as r:
                    await r.read()
                    cycle.requests += 1
                    rid = r.headers.get("x-request-id", rid)
                    if r.status == 200:
                        cycle.answered += 1
                        feedback = f"{gateway.url}/v2/models/fraud/feedback"
                        async with http.post(feedback, json={"id": rid, "label": label}) as f:
                            await f.read()
            except aiohttp.ClientError:
                return
            i += 4

    async def operator() -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        while time.monotonic() < stop:
            await asyncio.sleep(rng.uniform(0.1, 0.8))
            if rng.random() < 0.35:
                write_policy(policies, rng)
                cycle.reloads += 1
                continue
            action = rng.choice(ACTIONS)
            url = f"{gateway.admin_url}/admin/rollouts/{NAME}/{action}"
            try:
                body = {"actor": "soak", "reason": "soak"}
                async with http.post(url, json=body, headers=headers) as r:
                    await r.read()
                    cycle.actions += r.status == 200
            except aiohttp.ClientError:
                return

    await asyncio.gather(*(client(w) for w in range(4)), operator())


def check_files(state: Path, key: AuditKey) -> tuple[str, str, int]:
    """(`audit verify` result, state/log agreement, entries) on the frozen files."""
    done = subprocess.run(
        [sys.executable, "-m", "rollguard.proxy.cli", "audit", "--state", str(state), "verify"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    verified = "ok" if done.returncode == 0 else f"FAIL: {done.stderr.strip()[:200]}"
    fd = os.open(state / "audit.jsonl", os.O_RDONLY)
    try:
        walk = walk_file(fd, key)
    finally:
        os.close(fd)
    stored = StateStore(state / "rollouts", key=key).read(NAME)
    record = walk.records.get(NAME)
    if stored is None or record is None or record.state is None:
        agreement = "ok (no state yet)" if stored is None else "FAIL: a state, no record"
    elif stored.audit_seq == record.seq:
        diff = [k for k in (*OUTCOME, "phase") if stored.state.get(k) != record.state.get(k)]
        terminal = {"promoted", "rolled_back", "concluded"}
        if (
            "phase" in diff
            and not {stored.state.get("phase"), record.state.get("phase")} & terminal
        ):
            diff.remove("phase")  # bookkeeping phases (waiting) need no entry
        agreement = "ok" if not diff else f"FAIL: {diff} differ"
    elif stored.audit_seq == walk.last_seq + 1:
        agreement = "ok (saved, entry next)"  # frozen between the save and its entry
    else:
        agreement = f"FAIL: state at entry {stored.audit_seq}, last record {record.seq}"
    return verified, agreement, walk.lines


def describe(doc: dict[str, Any] | None) -> str:
    return "-" if doc is None else f"g{doc['generation']}/{doc['phase']}"


async def soak(args: argparse.Namespace) -> list[Cycle]:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="rollguard-soak-"))
    policies, state = root / "policies", root / "state"
    policies.mkdir()
    write_policy(policies, rng)
    from rollguard.serving.demo.build import load_eval_data

    features, labels = load_eval_data()
    rows = [(features[i].tolist(), int(labels[i])) for i in range(len(labels))]
    key = AuditKey(KEY.encode())
    cycles: list[Cycle] = []
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        last: dict[str, Any] | None = None
        for n in range(1, args.cycles + 1):
            cycle = Cycle(n)
            gateway = GatewayProcess(
                registry=args.registry, policies=policies, state=state,
                log=root / "serve.log", env=env(),
            )  # fmt: skip
            began = time.monotonic()
            is_ready = await ready(gateway, http, 60)
            cycle.ready_s = time.monotonic() - began
            if not is_ready:
                cycle.problems.append(f"did not start: see {root / 'serve.log'}")
                gateway.kill()
                cycles.append(cycle)
                print(f"cycle {n}: gateway did not start", file=sys.stderr)
                break
            # Checks on the files as this restart left them, with the gateway frozen.
            now = await rollout(gateway, http)
            gateway.proc.send_signal(signal.SIGSTOP)
            try:
                cycle.verify, cycle.agreement, cycle.entries = check_files(state, key)
            finally:
                gateway.proc.send_signal(signal.SIGCONT)
            cycle.before, cycle.after = describe(last), describe(now)
            cycle.kept = kept(last, now)
            for text in (cycle.verify, cycle.agreement, cycle.kept):
                if text.startswith("FAIL"):
                    cycle.problems.append(text)
            # Then a random stretch of work, and the kill: sometimes in the next start-up.
            if rng.random() < 0.2:
                cycle.killed_at = "start-up"
                gateway.kill()
                gateway = GatewayProcess(
                    registry=args.registry, policies=policies, state=state,
                    log=root / "serve.log", env=env(),
                )  # fmt: skip
                await asyncio.sleep(rng.uniform(0.05, 1.5))
                last = None  # nothing observed in this one
            else:
                cycle.killed_at = "running"
                cycle.run_s = rng.uniform(0.3, 3.0)
                await drive(gateway, http, rng, rows, policies, cycle, cycle.run_s)
                last = await rollout(gateway, http)
            gateway.kill()
            cycles.append(cycle)
            flag = "FAIL " + "; ".join(cycle.problems) if cycle.problems else "ok"
            print(f"cycle {n}: {cycle.killed_at} {describe(last)} -> {flag}", flush=True)
    return cycles


def kept(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """A terminal outcome seen before the kill is the outcome after it (same generation)."""
    if before is None or after is None:
        return "n/a"
    terminal = {"promoted", "rolled_back", "concluded"}
    if before["phase"] not in terminal or before["generation"] != after["generation"]:
        return "n/a"
    return "ok" if after["phase"] == before["phase"] else f"FAIL: {before['phase']} lost"


def table(cycles: list[Cycle], args: argparse.Namespace, seconds: float) -> str:
    failed = [c for c in cycles if c.problems]
    kept_checked = sum(c.kept == "ok" for c in cycles)
    lines = [
        "# SIGKILL soak: audit chain and state after every restart",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `python -m load_tests.soak_kill "
        f"--cycles {args.cycles} --seed {args.seed}`, {seconds:.0f} s in all.",
        "",
        f"- cycles: {len(cycles)} of {args.cycles}; failed checks: {len(failed)}",
        f"- killed during start-up: {sum(c.killed_at == 'start-up' for c in cycles)}, "
        f"while running: {sum(c.killed_at == 'running' for c in cycles)}",
        f"- requests: {sum(c.requests for c in cycles)} "
        f"({sum(c.answered for c in cycles)} answered 200), operator actions applied: "
        f"{sum(c.actions for c in cycles)}, policy reloads: {sum(c.reloads for c in cycles)}",
        f"- terminal outcomes checked across a kill: {kept_checked}",
        f"- audit entries at the end: {cycles[-1].entries if cycles else 0}",
        f"- restart to ready: median {_median([c.ready_s for c in cycles]):.2f} s, "
        f"max {max((c.ready_s for c in cycles), default=0):.2f} s",
        "",
        "| cycle | killed | run s | requests (200) | actions | reloads | before kill | after "
        "restart | ready s | entries | audit verify | state = log | outcome kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cycles:
        lines.append(
            f"| {c.n} | {c.killed_at or '-'} | {c.run_s:.1f} | {c.requests} ({c.answered}) | "
            f"{c.actions} | "
            f"{c.reloads} | {c.before} | {c.after} | {c.ready_s:.2f} | {c.entries} | "
            f"{c.verify} | {c.agreement} | {c.kept} |"
        )
    return "\n".join(lines) + "\n"


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def build_registry() -> Path:
    root = Path(tempfile.mkdtemp(prefix="rollguard-soak-registry-")) / "registry"
    code = "from pathlib import Path; from rollguard.serving.demo.build import "
    code += f"build_demo_registry; build_demo_registry(Path({str(root)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--registry", type=Path, help="default: build the demo registry")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.registry is None:
        args.registry = build_registry()
    began = time.monotonic()
    cycles = asyncio.run(soak(args))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table(cycles, args, time.monotonic() - began))
    failed = [c for c in cycles if c.problems]
    print(f"{len(cycles)} cycles, {len(failed)} failed; table in {args.output}")
    return 1 if failed or len(cycles) < args.cycles else 0


if __name__ == "__main__":
    sys.exit(main())
