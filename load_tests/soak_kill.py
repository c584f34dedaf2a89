"""SIGKILL soak: kill a real `rollguard serve` at random points, restart it, check the records.

    python -m load_tests.soak_kill --cycles 100 [--seed 1] [--registry DIR] [--output FILE]

Each cycle starts the gateway (a child process on loopback, an admin token and an audit
key in its environment) over one state directory kept across cycles, lets clients send
predictions and labels while the rollout decides on its own, an operator acts (pause,
resume, rollback, promote, approve, each under its own actor name) and the policy file
is rewritten (a new candidate, 1.1.0 good or 1.2.0 faulty, new holds, approval or not).
Then it SIGKILLs the gateway at one of these points, chosen at random:

- `start-up`: a fresh gateway is killed at a random moment before it is ready (audit
  open and repair, model loads, state recovery);
- `quiet`: traffic and the operator have stopped; decisions and the policy watcher run;
- `traffic`: clients are mid-request and decisions run;
- `admin`: as `traffic`, with 1 to 3 operator actions sent a moment before the kill.

Right after the kill (before the start-up gateway, for a `start-up` kill) it may inject
one fault: a `torn tail` (the first bytes of an entry appended without its newline), a
`torn record` (the log's last entry, a record of the rollout whose state file names it,
cut to its first bytes and the head set back: exactly what a crash in the middle of
appending a decision leaves, its state already saved) or a `lost state` (the rollout's
state file deleted). After every restart, with the gateway frozen (SIGSTOP) so that the
files hold still, it checks:

- `audit verify`: `rollguard audit verify` (the real CLI, with the key) exits 0;
- `state = log`: the state file agrees with the log (policy/recovery.py's rule: its
  `audit_seq` is the rollout's last record and its outcome is that record's, or it was
  saved just before the kill and its record is the next entry);
- `log kept`: the log begins with every whole line it held at the kill;
- `acked`: every operator action answered 200 before the kill has its `admin` entry;
- `outcome kept`: a terminal outcome seen before the kill (rolled back, promoted) is the
  outcome after the restart, for the same generation: no decision lost;
- `fault`: a torn tail was cut and a `repair` entry records its bytes; a torn record was
  repaired and its decision applied and audited (a `state_recovered` entry with its
  outcome); a lost state file was rebuilt from the log (a `state_recovered` entry, the
  file written again). Checked on everything appended since the fault, so also when a
  start-up gateway was killed in between.

It writes a table to load_tests/results/soak_kill.md; exit status 0 when every check held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from rollguard.policy.chain import RECORD_KINDS, walk_file
from rollguard.policy.keys import AuditKey
from rollguard.policy.recovery import OUTCOME
from rollguard.policy.store import StateStore, canonical, write_atomic
from rollguard.proxy.process import GatewayProcess

RESULTS = Path(__file__).resolve().parent / "results" / "soak_kill.md"
TOKEN = "soak-admin-token-0123456789abcdef"  # 33 characters
KEY = "soak-audit-key-0123456789abcdef-0123456789"
NAME = "fraud"
ACTIONS = ("pause", "resume", "rollback", "promote", "approve")
KILL_POINTS = {"start-up": 0.2, "quiet": 0.2, "traffic": 0.35, "admin": 0.25}
FAULTS = {"": 0.55, "torn tail": 0.15, "torn record": 0.15, "lost state": 0.15}
FITTING = {"paused": "resume", "awaiting_approval": "approve", "progressing": "pause"}
TERMINAL = frozenset({"promoted", "rolled_back", "concluded"})
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
    killed_at: str = ""  # one of KILL_POINTS
    fault: str = ""  # the fault injected before this cycle's restart, if any
    run_s: float = 0.0
    requests: int = 0
    answered: int = 0  # 200s
    actions: int = 0  # operator actions answered 200
    reloads: int = 0
    before: str = ""  # generation/phase seen last before the previous kill
    after: str = ""  # after this restart
    ready_s: float = 0.0  # restart to ready
    entries: int = 0
    verify: str = ""
    agreement: str = ""
    prefix: str = ""
    acked: str = ""
    kept: str = ""
    handled: str = ""  # the injected fault's check
    problems: list[str] = field(default_factory=list)

    def checks(self) -> list[str]:
        return [self.verify, self.agreement, self.prefix, self.acked, self.kept, self.handled]


@dataclass
class Killed:
    """What the previous kill left, for the checks after the next restart."""

    log: bytes = b""  # the log's whole lines at the last kill
    base: bytes = b""  # its whole lines once the fault was injected
    acked: list[str] = field(default_factory=list)  # actors of actions answered 200
    fired: set[str] = field(default_factory=set)  # actions sent after the last look
    seen: dict[str, Any] | None = None  # the rollout as last seen before the kill
    fault: str = ""
    torn: bytes = b""
    record: dict[str, Any] | None = None  # a torn record's entry, as it was
    had_record: bool = False  # the log held a state for the rollout (a lost file rebuilds)


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


def pick(rng: random.Random, weights: dict[str, float], only: list[str] | None) -> str:
    chosen = {k: w for k, w in weights.items() if only is None or k in only}
    return rng.choices(list(chosen), weights=list(chosen.values()))[0]


async def ready(gateway: GatewayProcess, http: aiohttp.ClientSession, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if gateway.proc.poll() is not None:
            return False
        try:
            async with http.get(f"{gateway.url}/v2/health/ready") as r:
                if r.status == 200:
                    return True
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.05)
    return False


async def rollout(gateway: GatewayProcess, http: aiohttp.ClientSession) -> dict[str, Any] | None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with http.get(f"{gateway.admin_url}/admin/rollouts/{NAME}", headers=headers) as r:
            return dict(await r.json()) if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


class Work:
    """Clients sending predictions and labels, and an operator acting and rewriting the policy."""

    def __init__(
        self,
        gateway: GatewayProcess,
        http: aiohttp.ClientSession,
        rng: random.Random,
        rows: list[tuple[list[float], int]],
        policies: Path,
        cycle: Cycle,
    ) -> None:
        self.gateway, self.http, self.rng, self.rows = gateway, http, rng, rows
        self.policies, self.cycle = policies, cycle
        self.acked: list[str] = []
        self.stop_clients, self.stop_operator = asyncio.Event(), asyncio.Event()
        self._fired = 0

    def start(self) -> tuple[list[asyncio.Task[None]], asyncio.Task[None]]:
        clients = [asyncio.create_task(self._client(w)) for w in range(4)]
        return clients, asyncio.create_task(self._operator())

    async def act(self, action: str) -> None:
        """One operator action under its own actor name; remembered when answered 200."""
        self._fired += 1
        actor = f"soak-{self.cycle.n}-{self._fired}"
        url = f"{self.gateway.admin_url}/admin/rollouts/{NAME}/{action}"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        try:
            body = {"actor": actor, "reason": "soak"}
            async with self.http.post(url, json=body, headers=headers) as r:
                await r.read()
                if r.status == 200:
                    self.acked.append(actor)
                    self.cycle.actions += 1
        except (aiohttp.ClientError, TimeoutError):
            pass

    async def _client(self, w: int) -> None:
        i, gateway, cycle = w, self.gateway, self.cycle
        while not self.stop_clients.is_set():
            features, label = self.rows[i % len(self.rows)]
            rid = f"c{cycle.n}-{w}-{i}"
            headers = {"x-user-id": f"user-{self.rng.randrange(10**6)}", "x-request-id": rid}
            try:
                url = f"{gateway.url}/predict/fraud"
                async with self.http.post(url, json={"features": features}, headers=headers) as r:
                    await r.read()
                    cycle.requests += 1
                    rid = r.headers.get("x-request-id", rid)
                    if r.status == 200:
                        cycle.answered += 1
                        feedback = f"{gateway.url}/v2/models/fraud/feedback"
                        async with self.http.post(feedback, json={"id": rid, "label": label}) as f:
                            await f.read()
            except (aiohttp.ClientError, TimeoutError):
                return
            i += 4

    async def _operator(self) -> None:
        while not self.stop_operator.is_set():
            try:
                await asyncio.wait_for(self.stop_operator.wait(), self.rng.uniform(0.1, 0.8))
                return
            except TimeoutError:
                pass
            if self.rng.random() < 0.35:
                write_policy(self.policies, self.rng)
                self.cycle.reloads += 1
            else:
                await self.act(self.rng.choice(ACTIONS))


async def run_and_kill(
    gateway: GatewayProcess, work: Work, cycle: Cycle, killed: Killed, rng: random.Random
) -> None:
    """Drive the work for `cycle.run_s`, look at the rollout, and kill at `cycle.killed_at`."""
    clients, operator = work.start()
    await asyncio.sleep(cycle.run_s)
    work.stop_operator.set()
    await operator  # no action in flight while looking: the look is the last word
    if cycle.killed_at == "quiet":
        work.stop_clients.set()
        await asyncio.gather(*clients)
    killed.seen = await rollout(gateway, work.http)
    fired: list[asyncio.Task[None]] = []
    if cycle.killed_at == "admin":
        actions = rng.sample(ACTIONS, rng.randint(1, 3))
        killed.fired = set(actions)
        fired = [asyncio.create_task(work.act(a)) for a in actions]
        await asyncio.sleep(rng.uniform(0.0, 0.03))
    elif cycle.killed_at == "quiet":
        await asyncio.sleep(rng.uniform(0.0, 0.6))  # anywhere in a decision interval
    gateway.kill()
    work.stop_clients.set()
    await asyncio.gather(*clients, *fired)
    killed.acked = list(work.acked)


def whole_lines(path: Path) -> bytes:
    raw = path.read_bytes() if path.exists() else b""
    return raw[: raw.rfind(b"\n") + 1]


def inject(state: Path, killed: Killed, key: AuditKey, rng: random.Random) -> None:
    """Leave the chosen fault in the state directory before the next start."""
    log = state / "audit.jsonl"
    lines = whole_lines(log).splitlines(keepends=True)
    entries = [json.loads(line) for line in lines]
    killed.had_record = any(
        e["rollout"] == NAME and isinstance((e.get("data") or {}).get("state"), dict)
        for e in entries
    )
    stored = StateStore(state / "rollouts", key=key).read(NAME)
    last = entries[-1] if entries else None
    if (
        killed.fault == "torn record"
        and last is not None
        and last["rollout"] == NAME
        and last["kind"] in RECORD_KINDS
        and isinstance(last["data"].get("state"), dict)
        and stored is not None
        and stored.audit_seq == last["seq"]
        and last["actor"] not in killed.acked  # answered 200: it was whole before the answer
    ):
        killed.record = last
        killed.torn = lines[-1][: rng.randrange(1, len(lines[-1]) - 2)]
        head = canonical({"seq": last["seq"] - 1, "hash": last["prev"]}) + b"\n"
        write_atomic(state / "audit.jsonl.head", head)  # not yet recorded: the crash came first
        write_atomic(log, b"".join(lines[:-1]) + killed.torn)
    elif killed.fault == "torn record":
        killed.fault = "torn tail"  # the last entry is not a state's record: tear it anyway
    if killed.fault == "torn tail" and last is not None:
        # The next append had begun, so the last one had recorded its head (the kill may
        # have fallen between an append and its head: the process finished that first).
        head = canonical({"seq": last["seq"], "hash": last["hash"]}) + b"\n"
        write_atomic(state / "audit.jsonl.head", head)
        killed.torn = lines[-1][: rng.randrange(1, len(lines[-1]) - 2)]
        with log.open("ab") as f:
            f.write(killed.torn)
    elif killed.fault == "lost state":
        (state / "rollouts" / f"{NAME}.json").unlink(missing_ok=True)
    killed.base = killed.log = whole_lines(log)


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
        phases = {stored.state.get("phase"), record.state.get("phase")}
        if "phase" in diff and not phases & TERMINAL:
            diff.remove("phase")  # bookkeeping phases (waiting) need no entry
        agreement = "ok" if not diff else f"FAIL: {diff} differ"
    elif stored.audit_seq == walk.last_seq + 1:
        agreement = "ok (saved, entry next)"  # frozen between the save and its entry
    else:
        agreement = f"FAIL: state at entry {stored.audit_seq}, last record {record.seq}"
    return verified, agreement, walk.lines


def check_records(state: Path, killed: Killed) -> tuple[str, str, str]:
    """(log kept, acknowledged actions in the log, the injected fault handled)."""
    now = (state / "audit.jsonl").read_bytes()
    prefix = "ok" if now.startswith(killed.log) else "FAIL: the log's earlier lines changed"
    added = [json.loads(line) for line in now[len(killed.base) :].splitlines()]
    everything = [json.loads(line) for line in now.splitlines()]
    admins = {e["actor"] for e in everything if e["kind"] == "admin"}
    missing = [a for a in killed.acked if a not in admins]
    acked = "n/a" if not killed.acked else "ok" if not missing else f"FAIL: {missing} lost"
    handled = "n/a"
    if killed.fault in ("torn tail", "torn record") and killed.torn:
        first = added[0] if added else {}
        dropped = (first.get("data") or {}).get("dropped_bytes")
        good = first.get("kind") == "repair" and dropped == len(killed.torn)
        handled = "ok (repair)" if good else f"FAIL: first new entry {first.get('kind')}"
        if good and killed.record is not None:
            handled = applied(killed.record, added)
    elif killed.fault == "lost state":
        rebuilt = [
            e for e in added
            if e["kind"] == "state_recovered" and "state file missing" in e["data"]["reason"]
        ]  # fmt: skip
        on_disk = (state / "rollouts" / f"{NAME}.json").exists()
        if not killed.had_record:
            handled = "ok (new rollout)" if not rebuilt else "FAIL: rebuilt from nothing"
        else:
            handled = "ok (rebuilt)" if rebuilt and on_disk else "FAIL: not rebuilt from the log"
    return prefix, acked, handled


def applied(record: dict[str, Any], added: list[dict[str, Any]]) -> str:
    """The torn record's decision was applied from its saved state and audited again."""
    torn = record["data"]["state"]
    for e in added:
        if e["kind"] == "state_recovered" and e["rollout"] == NAME:
            got = e["data"]["state"]
            diff = [k for k in (*OUTCOME, "phase") if got.get(k) != torn.get(k)]
            if "never audited" not in e["data"]["reason"]:
                return f"FAIL: recovered as {e['data']['reason']!r}"
            return "ok (repair, decision applied)" if not diff else f"FAIL: {diff} differ"
    return "FAIL: the torn decision was not applied"


def describe(doc: dict[str, Any] | None) -> str:
    return "-" if doc is None else f"g{doc['generation']}/{doc['phase']}"


def kept(before: dict[str, Any] | None, after: dict[str, Any] | None, fired: set[str]) -> str:
    """A terminal outcome seen before the kill is the outcome after it (same generation).

    Only an operator's rollback, sent after the look, may turn a promotion into a rollback."""
    if before is None or after is None:
        return "n/a"
    if before["phase"] not in TERMINAL or before["generation"] != after["generation"]:
        return "n/a"
    if after["phase"] == before["phase"]:
        return "ok"
    if (before["phase"], after["phase"]) == ("promoted", "rolled_back") and "rollback" in fired:
        return "ok (rolled back after)"
    return f"FAIL: {before['phase']} lost"


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
    killed = Killed()
    timeout = aiohttp.ClientTimeout(total=10)

    def serve() -> GatewayProcess:
        return GatewayProcess(
            registry=args.registry, policies=policies, state=state,
            log=root / "serve.log", env=env(),
        )  # fmt: skip

    async with aiohttp.ClientSession(timeout=timeout) as http:
        for n in range(1, args.cycles + 1):
            cycle = Cycle(n, fault=killed.fault)
            gateway = serve()
            began = time.monotonic()
            is_ready = await ready(gateway, http, 120)
            cycle.ready_s = time.monotonic() - began
            if not is_ready:
                cycle.problems.append(f"did not start: see {root / 'serve.log'}")
                gateway.kill()
                cycles.append(cycle)
                print(f"cycle {n}: gateway did not start (see {root / 'serve.log'})", flush=True)
                break
            # Checks on the files as this restart left them, with the gateway frozen.
            now = await rollout(gateway, http)
            gateway.proc.send_signal(signal.SIGSTOP)
            try:
                cycle.verify, cycle.agreement, cycle.entries = check_files(state, key)
                cycle.prefix, cycle.acked, cycle.handled = check_records(state, killed)
            finally:
                gateway.proc.send_signal(signal.SIGCONT)
            cycle.before, cycle.after = describe(killed.seen), describe(now)
            cycle.kept = kept(killed.seen, now, killed.fired)
            cycle.problems += [c for c in cycle.checks() if c.startswith("FAIL")]
            # Then a stretch of work and the kill, and maybe a fault before the next start.
            killed = Killed(fault=pick(rng, FAULTS, args.faults))
            cycle.killed_at = pick(rng, KILL_POINTS, args.kill_points)
            if cycle.killed_at == "start-up":
                killed.seen = now  # nothing after this look changes a terminal outcome
                if killed.fault == "torn record" and now is not None:
                    # A record to tear: an action whose append the crash cuts (no answer).
                    work = Work(gateway, http, rng, rows, policies, cycle)
                    await work.act(FITTING.get(now["phase"], "rollback"))
                    killed.seen = await rollout(gateway, http)
                else:
                    await asyncio.sleep(rng.uniform(0.0, 0.6))  # decisions and the watcher run
                gateway.kill()
                inject(state, killed, key, rng)
                gateway = serve()  # the fault meets a start that is killed in turn
                await asyncio.sleep(rng.uniform(0.0, max(cycle.ready_s, 1.0)))
                gateway.kill()
                killed.log = whole_lines(state / "audit.jsonl")
            else:
                cycle.run_s = rng.uniform(0.3, 3.0)
                work = Work(gateway, http, rng, rows, policies, cycle)
                await run_and_kill(gateway, work, cycle, killed, rng)
                inject(state, killed, key, rng)
            cycles.append(cycle)
            flag = "FAIL " + "; ".join(cycle.problems) if cycle.problems else "ok"
            print(
                f"cycle {n}: [{cycle.fault or '-'}] {cycle.after} -> killed at {cycle.killed_at} "
                f"{describe(killed.seen)} -> {flag}",
                flush=True,
            )
    return cycles


def table(cycles: list[Cycle], args: argparse.Namespace, seconds: float) -> str:
    failed = [c for c in cycles if c.problems]
    checked = [c for cycle in cycles for c in cycle.checks() if c and c != "n/a"]
    bad = [c for c in checked if c.startswith("FAIL")]

    def count(attr: str, value: str) -> int:
        return sum(getattr(c, attr) == value for c in cycles)

    points = ", ".join(f"{p} {count('killed_at', p)}" for p in KILL_POINTS)
    faults = ", ".join(f"{f} {count('fault', f)}" for f in FAULTS if f)
    lines = [
        "# SIGKILL soak: audit chain and state after every restart",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `python -m load_tests.soak_kill "
        f"--cycles {args.cycles} --seed {args.seed}`, {seconds:.0f} s in all "
        f"({os.cpu_count()} cores, shared).",
        "",
        f"- cycles: {len(cycles)} of {args.cycles}; failed checks: {len(failed)}",
        f"- checks run: {len(checked)}, failed: {len(bad)} (n/a where a check does not apply)",
        f"- kill points: {points}",
        f"- faults injected before a restart: {faults}",
        f"- requests: {sum(c.requests for c in cycles)} "
        f"({sum(c.answered for c in cycles)} answered 200), operator actions answered 200: "
        f"{sum(c.actions for c in cycles)}, policy reloads: {sum(c.reloads for c in cycles)}",
        f"- terminal outcomes checked across a kill: {sum(c.kept.startswith('ok') for c in cycles)}"
        f"; cycles with acknowledged actions checked in the log: {count('acked', 'ok')}",
        f"- audit entries at the end: {cycles[-1].entries if cycles else 0}",
        f"- restart to ready: median {_median([c.ready_s for c in cycles]):.2f} s, "
        f"max {max((c.ready_s for c in cycles), default=0):.2f} s",
        "",
        "Columns: `fault` was injected after the previous kill, before this restart; the "
        "checks that follow are on the files this restart left; `killed at` is where this "
        "cycle's own kill fell.",
        "",
        "| cycle | fault | ready s | entries | audit verify | state = log | log kept | acked "
        "| before kill | after restart | outcome kept | fault handled | killed at | run s "
        "| requests (200) | actions | reloads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cycles:
        lines.append(
            f"| {c.n} | {c.fault or '-'} | {c.ready_s:.2f} | {c.entries} | {c.verify} | "
            f"{c.agreement} | {c.prefix} | {c.acked} | {c.before} | {c.after} | {c.kept} | "
            f"{c.handled} | {c.killed_at or '-'} | {c.run_s:.1f} | {c.requests} ({c.answered}) "
            f"| {c.actions} | {c.reloads} |"
        )
    return "\n".join(lines) + "\n"


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def _choices(known: dict[str, float]) -> Any:
    def parse(text: str) -> list[str]:
        names = ["" if n.strip() == "none" else n.strip() for n in text.split(",")]
        if unknown := [n for n in names if n not in known]:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; expected some of {list(known)}")
        return names

    return parse


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
    parser.add_argument(
        "--kill-points", type=_choices(KILL_POINTS), help="only these, comma-separated"
    )
    parser.add_argument(
        "--faults", type=_choices(FAULTS), help="only these ('none' for none), comma-separated"
    )
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
