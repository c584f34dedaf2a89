"""One simulated rollout through the gateway's real decision code, on a simulated clock.

The parts that decide are the gateway's own: the rollout shell (proxy/rollouts.py
`Rollouts`: policy file → loader → recovery → lifecycle → effects, `tick`), the real
state directory and audit log, and a real `Inference` (proxy/inference.py) holding the
per-variant `VariantWindow`s, the router whose `SplitTable` routes each request (the
sticky hash split included) and the feedback index; labels come back through
`Inference.feedback`, as POST /feedback hands them in. Only the model call is
simulated: a request is drawn (error, latency, prediction, label), routed by the table
and recorded in its window the way `Inference.infer` records an answer (the lines
marked "as Inference.infer" below; infer itself awaits a runner per request, 20× the
cost of the rest).

Time is simulated. `Rollouts` has no clock argument (it reads the module's `_now()`,
wall-clock seconds), so `SimClock` stands in for that function while a replicate runs;
nothing sleeps. The shell's tick and availability loops are never started: the driver
calls `Rollouts.tick` every `spec.interval` simulated seconds, as `_tick_loop` would.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import yaml
from prometheus_client import CollectorRegistry

from rollguard.policy.schema import Rollout
from rollguard.proxy import rollouts as shell
from rollguard.proxy import routing
from rollguard.proxy.inference import Inference, RequestIds
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.rollouts import Rollouts
from rollguard.proxy.routing import Router, SplitTable
from rollguard.proxy.settings import Settings
from rollguard.proxy.shadow import ShadowMirror
from rollguard.proxy.windows import Outcome, Windows
from rollguard.serving.availability import Availability
from rollguard.serving.errors import NotReady
from rollguard.serving.registry import Registry

T0 = 1_800_000_000.0  # the simulated epoch (seconds)
LATENCY_MU, LATENCY_SIGMA = math.log(0.05), 0.5  # lognormal, 50 ms median
TERMINAL = ("promoted", "rolled_back", "concluded", "inconclusive")
_CHUNK = 4096  # requests drawn at once


@dataclass(frozen=True)
class Traffic:
    """What the simulated clients send and the two versions answer.

    Rates drift linearly from the first value to `*_end` over the horizon (both arms
    alike, multiplied by the candidate's own factor); users, when given, are sticky keys
    drawn with Zipf activity, each with a gamma-distributed multiplier of the error rate
    (shape `heterogeneity`, mean 1; 0: none)."""

    rate: float = 100.0  # requests per second
    error: tuple[float, float] = (0.01, 0.01)  # stable, candidate error rate at the start
    error_end: tuple[float, float] | None = None  # ... and at the horizon (None: constant)
    latency: tuple[float, float] = (1.0, 1.0)  # latency multipliers, stable and candidate
    latency_end: float = 1.0  # both arms' latency multiplier reached at the horizon
    accuracy: tuple[float, float] = (0.90, 0.90)
    accuracy_drop: float = 0.0  # both arms' accuracy lower by this much at the horizon
    label_rate: float = 0.6  # share of answered requests whose label comes back
    label_delay: float = 1000.0  # mean label delay, in requests (exponential)
    users: int = 0  # 0: every request its own random draw (split: random)
    zipf: float = 1.1
    heterogeneity: float = 0.0


@dataclass
class Replicate:
    """How one rollout ended and what it took."""

    end: str = "running"  # a terminal phase, or running (still undecided at the horizon)
    reason: str = ""
    seconds: float = 0.0  # simulated seconds until the end (or the horizon)
    requests: int = 0
    candidate_requests: int = 0  # routed to the candidate, over the whole replicate
    failed: list[str] = field(default_factory=list)  # checks that FAILed at the end
    holds: list[str] = field(default_factory=list)  # metrics that ever held the rollout
    max_weight: float = 0.0
    labels_sent: tuple[int, int] = (0, 0)  # labels posted (by the end) for each arm's requests
    labels_counted: tuple[int, int] = (0, 0)  # labels the windows counted (since last reset)
    restarts: int = 0
    resumed: int = 0  # restarts after which the rollout went on at the step and weight it had


class SimClock:
    """The shell's clock while a replicate runs (`rollguard.proxy.rollouts._now`)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    @contextmanager
    def installed(self) -> Iterator[SimClock]:
        real = shell._now
        shell._now = self
        try:
            yield self
        finally:
            shell._now = real


class _Candidates:
    """The registry as the shell sees it: every version ready, no drift references."""

    def availability(self, model: str, version: str) -> Availability:
        return Availability.READY

    def get(self, model: str, version: str) -> Any:
        raise NotReady(f"{model}/{version}: simulated, no files")


class Gateway:
    """A gateway process as far as rollouts go: a fresh data plane over the same files."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.name = name
        self.settings = settings
        metrics = Metrics(CollectorRegistry())
        shadow = ShadowMirror(
            metrics, concurrency=1, queue=0, timeout_s=1.0, budget=0.0, gauge=None
        )
        self.plane = Inference(
            cast(Registry, _Candidates()),
            router=Router(),
            metrics=metrics,
            windows=Windows(settings.window, settings.agreement_tolerance),
            feedback_capacity=settings.feedback_capacity,
            feedback_max_age_s=settings.feedback_max_age_s,
            shadow=shadow,
            agreement_tolerance=settings.agreement_tolerance,
            request_ids=RequestIds(),
        )
        self.rollouts = Rollouts(self.plane, settings)
        self.rollouts.reload()  # the policy file: loaded, recovered or begun
        if self.rollouts.rejected:
            raise ValueError(f"policy rejected: {self.rollouts.rejected}")
        spec = self.rollouts.describe(name)
        self.model, self.stable, self.candidate = spec["model"], spec["stable"], spec["candidate"]

    def tick(self) -> dict[str, Any]:
        return self.rollouts.tick(self.name)

    async def stop(self) -> None:
        await self.rollouts.stop()


def run_replicate(
    policy: str,
    traffic: Traffic,
    horizon: int,
    seed: int,
    *,
    restart_at: int | None = None,
    workdir: Path | None = None,
) -> Replicate:
    """Serve up to `horizon` requests under `policy` (Rollout YAML) until the rollout ends."""
    with tempfile.TemporaryDirectory(dir=workdir or _fast_dir()) as tmp:
        return asyncio.run(_replicate(policy, traffic, horizon, seed, restart_at, Path(tmp)))


def _fast_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None


async def _replicate(
    policy: str,
    traffic: Traffic,
    horizon: int,
    seed: int,
    restart_at: int | None,
    root: Path,
) -> Replicate:
    (root / "policies").mkdir()
    (root / "policies" / "sim.yaml").write_text(policy)
    settings = Settings(
        policies=root / "policies",
        state=root / "state",
        registry=root / "registry",
        webhook_allowed_hosts=("127.0.0.1", "localhost"),  # validated, never sent
    )
    rollout = Rollout.model_validate(yaml.safe_load(policy))
    name, interval = rollout.name, float(rollout.spec.interval)
    rng = np.random.default_rng(seed)
    clock = SimClock()
    out = Replicate()
    with clock.installed():
        gw = Gateway(settings, name)
        try:
            out = _serve(gw, traffic, horizon, rng, clock, restart_at, settings, interval)
        finally:
            await gw.stop()
    return out


class _Draws:
    """Per-request random numbers, drawn a chunk at a time."""

    def __init__(self, rng: np.random.Generator, traffic: Traffic, user_p: np.ndarray | None):
        self.rng, self.traffic, self.user_p = rng, traffic, user_p
        self.i = _CHUNK

    def refill(self) -> None:
        rng, t = self.rng, self.traffic
        self.gap = rng.exponential(1.0 / t.rate, _CHUNK).tolist()
        self.u_err = rng.random(_CHUNK).tolist()
        self.lat = np.exp(LATENCY_MU + LATENCY_SIGMA * rng.standard_normal(_CHUNK)).tolist()
        self.u_label = rng.random(_CHUNK).tolist()
        self.u_correct = rng.random(_CHUNK).tolist()
        self.delay = np.ceil(rng.exponential(t.label_delay, _CHUNK)).astype(int).tolist()
        self.user = (
            rng.choice(self.user_p.size, _CHUNK, p=self.user_p).tolist()
            if self.user_p is not None
            else None
        )
        self.i = 0


def _users(traffic: Traffic, rng: np.random.Generator) -> tuple[np.ndarray | None, list[str]]:
    if traffic.users <= 0:
        return None, []
    weights = 1.0 / np.arange(1, traffic.users + 1) ** traffic.zipf
    # Keys are drawn fresh per replicate: which users land on the candidate varies too.
    keys = [f"u{rng.integers(1 << 62):x}" for _ in range(traffic.users)]
    return weights / weights.sum(), keys


def _serve(
    gw: Gateway,
    t: Traffic,
    horizon: int,
    rng: np.random.Generator,
    clock: SimClock,
    restart_at: int | None,
    settings: Settings,
    spec_interval: float,
) -> Replicate:
    out = Replicate()
    user_p, keys = _users(t, rng)
    frailty = (
        rng.gamma(t.heterogeneity, 1.0 / t.heterogeneity, t.users)
        if t.users and t.heterogeneity > 0
        else None
    )
    draws = _Draws(rng, t, user_p)
    interval = spec_interval
    next_tick = clock.now + interval
    pending: list[tuple[int, int, str, float]] = []  # (due request, arm, request id, label)
    sent, holds = [0, 0], set[str]()
    last: dict[str, Any] = {}
    routing._RNG.seed(int(rng.integers(1 << 62)))  # the tables share it
    served = 0
    start = clock.now
    for i in range(horizon):
        if restart_at is not None and i == restart_at:
            before = _where(gw)
            gw = _restart(gw, settings)
            out.restarts += 1
            out.resumed += _where(gw) == before
            pending.clear()  # a new process: labels for the old one's requests find nothing
        if draws.i >= _CHUNK:
            draws.refill()
        k = draws.i
        draws.i += 1
        clock.now += draws.gap[k]
        while clock.now >= next_tick:
            now, clock.now = clock.now, next_tick
            last = gw.tick()
            clock.now = now
            next_tick += interval
            state = last["state"]
            holds.update(state["holding"])
            out.max_weight = max(out.max_weight, float(state["weight"]))
            if state["phase"] in TERMINAL:
                return _ended(out, gw, last, clock.now - start, i, served, sent, holds)
        # labels due by now come back as POST /feedback hands them in
        while pending and pending[0][0] <= i:
            _, arm, rid, label = heapq.heappop(pending)
            sent[arm] += 1
            gw.plane.feedback(gw.model, [(rid, (label,))])
        progress = i / horizon
        table = gw.plane.router.table(gw.model)
        assert table is not None
        key = keys[draws.user[k]] if draws.user is not None else None
        version, role = table.choose(key)  # keyless: the seeded routing RNG draws
        arm = 1 if role == "candidate" else 0
        served += arm
        p = t.error[arm]
        if t.error_end is not None:
            p += (t.error_end[arm] - p) * progress
        if frailty is not None and draws.user is not None:
            p *= float(frailty[draws.user[k]])
        scale = t.latency[arm] * (1.0 + (t.latency_end - 1.0) * progress)
        rid = f"{i}"
        answered = draws.u_err[k] >= p
        _record(gw, table, version, key, rid, draws.lat[k] * scale, answered)
        if not answered:
            continue
        if draws.u_label[k] < t.label_rate:
            accuracy = t.accuracy[arm] - t.accuracy_drop * progress
            label = 1.0 if draws.u_correct[k] < accuracy else 0.0
            heapq.heappush(pending, (i + draws.delay[k], arm, rid, label))
    out = _ended(out, gw, last, clock.now - start, horizon, served, sent, holds)
    out.end = last.get("state", {}).get("phase", "running")
    if out.end not in TERMINAL:
        out.end = "running"
    return out


def _record(
    gw: Gateway,
    table: SplitTable,
    version: str,
    key: str | None,
    rid: str,
    latency: float,
    answered: bool,
) -> None:
    """One routed request's answer (prediction 1.0) or model error, recorded as
    Inference.infer records it: routed count, window, feedback index."""
    plane = gw.plane
    unit = key if table.split == "hash" else None
    window = plane.windows.get(gw.model, version)
    window.count_routed(unit)
    share = table.weight if table.failover is None else 0.0
    if not answered:
        window.record(latency, Outcome.MODEL_ERROR, rows=1, share=share, key=unit)
        return
    window.record(latency, Outcome.OK, rows=1, share=share, key=unit)
    plane.feedback_index.put(gw.model, None, rid, window, (1.0,), share)


def _where(gw: Gateway) -> tuple[str, int, float, int]:
    """Phase, step, weight and generation, as the admin API shows them."""
    doc = gw.rollouts.describe(gw.name)
    return doc["phase"], doc["step"], doc["weight"], doc["generation"]


def _restart(old: Gateway, settings: Settings) -> Gateway:
    """A new process on the same policies and state directories (the old one just dies:
    its never-started tick task is cancelled when the replicate's event loop ends)."""
    old.rollouts.audit.close()
    return Gateway(settings, old.name)


def _ended(
    out: Replicate,
    gw: Gateway,
    last: dict[str, Any],
    seconds: float,
    requests: int,
    served: int,
    sent: list[int],
    holds: set[str],
) -> Replicate:
    state = last.get("state", {})
    out.end = state.get("phase", "running")
    out.reason = str(last.get("reason", ""))
    out.seconds = seconds
    out.requests = requests
    out.candidate_requests = served
    out.failed = sorted(
        {str(c["metric"]) for c in last.get("checks", []) if c.get("verdict") == "fail"}
    )
    out.holds = sorted(holds)
    out.labels_sent = (sent[0], sent[1])
    windows = gw.plane.windows
    out.labels_counted = (
        windows.get(gw.model, gw.stable).evidence().labelled,
        windows.get(gw.model, gw.candidate).evidence().labelled,
    )
    return out
