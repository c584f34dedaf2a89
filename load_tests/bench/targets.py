"""The targets side by side: which servers each needs, started once, stopped at the end.

Every target answers POST <url> with the same body, except the two MLP targets: they
serve a compute-heavy model (load_tests/bench/mlp.py) for the issue's micro-batching
goal, with their own body, at 64 connections whatever --connections says. A target's
CPU cost counts every process that serves it: the proxy and its upstreams, nginx's
master and worker.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from load_tests.bench import mlp, mlserver_setup, models, nginx
from load_tests.bench.procs import Process, Processes, free_port, http_ok
from load_tests.bench.tools import Tool

REPO = Path(__file__).resolve().parents[2]
# A loopback benchmark: admin without a token, asked for explicitly (admin_auth none).
ROLLGUARD_ENV = {
    "ROLLGUARD_LOG_LEVEL": "WARNING",
    "ROLLGUARD_ADMIN_AUTH": "none",
    "ROLLGUARD_ADMIN_TOKEN": "",
    "PYTHONPATH": str(REPO),
}
INFER = f"/v2/models/{models.MODEL}/infer"
MLP_CONNECTIONS = 64  # the issue fixes the micro-batching goal at 64 connections


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    about: str
    url: str  # the infer URL the client posts to
    processes: tuple[Process, ...]  # every process whose CPU time this target costs
    base: str = ""  # http://host:port of the front server (data port: health)
    body: bytes | None = None  # None: the common body (models.request_body())
    connections: int | None = None  # None: --connections
    admin: str = ""  # http://host:port of rollguard's admin port (/admin, /metrics)
    mirror_count: str = ""  # URL of the count of requests its mirror upstream answered


ALL = (  # the two targets of each goal next to each other (see round_order)
    "bare",
    "rollguard",
    "rollguard-shadow",
    "bare-threads",
    "naive-proxy",
    "rollguard-proxy",
    "rollguard-proxy-shadow",
    "rollguard-proxy-canary",
    "nginx-proxy",
    "nginx-mirror",
    "nginx-split",
    "mlserver",
    "rollguard-mlp",
    "rollguard-mlp-batched",
)


@dataclass
class Lab:
    """Starts what the chosen targets need, each server at most once."""

    procs: Processes
    work: Path
    demo: Path
    nginx_tool: Tool
    install: bool = True
    mlp_shape: tuple[int, int] = (mlp.LAYERS, mlp.HIDDEN)  # layers, hidden units
    skipped: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    _bare: dict[str, tuple[Process, str]] = field(default_factory=dict)
    _nginx: nginx.Nginx | None = None
    _mlp: tuple[Path, Path] | None = None  # registries: without, with batching

    def bare(self, which: str, threads: int = 0) -> tuple[Process, str]:
        """Bare server A or B (two, for splits and mirrors); its base URL."""
        if which not in self._bare:
            port = free_port()
            argv = [sys.executable, "-m", "load_tests.bench.bare", "--port", str(port)]
            argv += ["--model", str(models.onnx_path(self.demo)), "--name", models.MODEL]
            argv += ["--threads", str(threads)]
            process = self.procs.start(f"bare-{which}", argv, env={"PYTHONPATH": str(REPO)})
            base = f"http://127.0.0.1:{port}"
            process.wait_ready(f"{base}/v2/health/ready", 60)
            self._bare[which] = (process, base)
        return self._bare[which]

    def _rollguard(
        self,
        name: str,
        registry: Path,
        strategy: str | None,
        module: str = "rollguard.proxy.cli",
        model: str = models.MODEL,
    ) -> tuple[Process, str, str]:
        """The process, its data-port base URL and its admin-port base URL."""
        port, admin_port = free_port(), free_port()
        argv = [sys.executable, "-m", module, "serve", "--port", str(port)]
        argv += ["--admin-port", str(admin_port)]
        argv += [
            "--registry",
            str(registry),
            "--policies",
            str(models.policies(self.work, strategy)),
        ]
        state = self.work / f"state-{name}"
        shutil.rmtree(state, ignore_errors=True)  # a rolled-back rollout would stay rolled back
        argv += ["--state", str(state)]
        # gRPC on as by default, on a port of its own (8082 may be taken).
        env = {**ROLLGUARD_ENV, "ROLLGUARD_GRPC_PORT": str(free_port())}
        process = self.procs.start(name, argv, env=env, cwd=REPO)
        base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        process.wait_ready(f"{base}/v2/models/{model}/ready", 120)
        if strategy is not None:  # the rollout must be routing before the run starts
            process.wait_ready(f"{base}/v2/models/{models.MODEL}/versions/1.1.0/ready", 60)
            process.wait_ready(f"{admin}/admin/rollouts/bench-{strategy}", 60)
        return process, base, admin

    def mlp_registries(self) -> tuple[Path, Path]:
        """The wide MLP's registries (without, with batching), trained once per Lab."""
        if self._mlp is None:
            try:
                layers, hidden = self.mlp_shape
                self._mlp = mlp.registries(self.work, hidden, layers)
            except ImportError as exc:
                raise LookupError(f"cannot build the MLP: {exc}") from None
        return self._mlp

    def _front_nginx(self) -> nginx.Nginx:
        if self._nginx is None:
            if self.nginx_tool.path is None:
                raise LookupError(self.nginx_tool.reason)
            a, b = self.bare("a")[1], self.bare("b")[1]
            self._nginx = nginx.start(
                self.procs,
                self.nginx_tool.path,
                self.work / "nginx",
                a.removeprefix("http://"),
                b.removeprefix("http://"),
                models.KEY_HEADER,
            )
            self._nginx.process.wait_ready(
                f"http://127.0.0.1:{self._nginx.proxy_port}/v2/health/ready", 30
            )
        return self._nginx

    def _make(self, name: str) -> Target:
        if name == "bare":
            p, base = self.bare("a")
            return Target(name, "aiohttp+uvloop+orjson+onnxruntime, 1 process", base + INFER, (p,))
        if name == "bare-threads":
            p, base = self.bare("threads", threads=2)
            about = "bare with the model on a 2-thread executor, as rollguard runs it"
            return Target(name, about, base + INFER, (p,))
        if name in ("rollguard", "rollguard-shadow"):
            strategy = "canary" if name == "rollguard" else "shadow"
            registry = models.inprocess_registry(self.demo, self.work)
            p, base, admin = self._rollguard(name, registry, strategy)
            about = (
                f"in-process ONNX, canary {models.CANARY_WEIGHT:g}% hash split active"
                if strategy == "canary"
                else "in-process ONNX, every request mirrored to a shadow version"
            )
            return Target(name, about, base + INFER, (p,), base, admin=admin)
        if name == "naive-proxy":
            a, upstream = self.bare("a")
            port = free_port()
            argv = [sys.executable, "-m", "load_tests.bench.naive_proxy", "--port", str(port)]
            p = self.procs.start(
                name, [*argv, "--upstream", upstream], env={"PYTHONPATH": str(REPO)}
            )
            base = f"http://127.0.0.1:{port}"
            p.wait_ready(f"{base}/v2/health/ready", 60)
            return Target(name, "aiohttp pass-through in front of bare", base + INFER, (p, a))
        if name.startswith("rollguard-proxy"):
            a, base_a = self.bare("a")
            endpoints = {models.STABLE: base_a}
            policy = {"canary": "canary", "shadow": "shadow"}.get(name.rpartition("-")[2])
            uppers: tuple[Process, ...] = (a,)
            if policy is not None:
                b, base_b = self.bare("b")
                endpoints[models.CANDIDATE] = base_b
                uppers = (a, b)
            registry = models.http_registry(self.demo, self.work, f"registry-{name}", endpoints)
            p, base, admin = self._rollguard(name, registry, policy)
            about = {
                None: "framework http in front of bare",
                "canary": f"canary {models.CANARY_WEIGHT:g}% hash split over bare A / bare B",
                "shadow": "bare A answers, every request mirrored to bare B",
            }[policy]
            return Target(name, about, base + INFER, (p, *uppers), base, admin=admin)
        if name.startswith("nginx"):
            front = self._front_nginx()
            a, b = self.bare("a")[0], self.bare("b")[0]
            kind = name.partition("-")[2]
            port, about, uppers = {
                "proxy": (front.proxy_port, "proxy_pass to bare, 1 worker", (a,)),
                "split": (
                    front.split_port,
                    f"split_clients {nginx.SPLIT_PERCENT}% bare B / bare A, 1 worker",
                    (a, b),
                ),
                "mirror": (front.mirror_port, "bare A answers, mirror to bare B, 1 worker", (a, b)),
            }[kind]
            mirror_count = self.bare("b")[1] + "/count" if kind == "mirror" else ""
            return Target(
                name,
                about,
                f"http://127.0.0.1:{port}{INFER}",
                (front.process, *uppers),
                mirror_count=mirror_count,
            )
        if name == "mlserver":
            executable, reason = mlserver_setup.ensure_venv(install=self.install)
            if executable is None:
                raise LookupError(reason)
            self.versions["mlserver"] = mlserver_setup.version(executable)
            repository = models.mlserver_model(self.demo, self.work)
            p, port = mlserver_setup.start(self.procs, executable, repository)
            base = f"http://127.0.0.1:{port}"
            p.wait_ready(f"{base}/v2/models/fraud/ready", 180)
            about = "MLServer scikit-learn runtime (joblib), parallel_workers 0"
            return Target(name, about, f"{base}/v2/models/fraud/infer", (p,))
        if name in ("rollguard-mlp", "rollguard-mlp-batched"):
            plain, batched = self.mlp_registries()
            registry = batched if name.endswith("-batched") else plain
            p, base, admin = self._rollguard(name, registry, None, model=mlp.MODEL)
            how = (
                f"micro-batching on (max_batch_size {mlp.BATCHING.max_batch_size}, "
                f"max_delay_ms {mlp.BATCHING.max_delay_ms:g})"
                if name.endswith("-batched")
                else "no batching"
            )
            about = (
                f"in-process ONNX {self.mlp_shape[0]}x{self.mlp_shape[1]} MLP (load_digits "
                f"row), {how}, "
                f"always {MLP_CONNECTIONS} connections; a different model and load, so its "
                "×bare ratios are not comparable (left empty)"
            )
            return Target(
                name,
                about,
                f"{base}/v2/models/{mlp.MODEL}/infer",
                (p,),
                base,
                body=mlp.request_body(),
                connections=MLP_CONNECTIONS,
                admin=admin,
            )
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(ALL)}")

    def start(self, names: list[str], log: Callable[[str], None]) -> list[Target]:
        """The targets that could be started; the others land in `skipped` with the reason."""
        started: list[Target] = []
        for name in names:
            log(f"starting {name} ...")
            try:
                started.append(self._make(name))
            except (LookupError, OSError, RuntimeError) as exc:
                self.skipped[name] = str(exc).strip().splitlines()[0] if str(exc) else repr(exc)
                log(f"  skipped {name}: {exc}")
        return started


def round_order(started: list[Target], round_: int) -> list[Target]:
    """The order of round `round_` (from 1): as started in odd rounds, reversed in even ones.

    A goal pairs two targets of one round; alternating the order cancels, over two rounds,
    a steady drift of the machine's speed that would otherwise always favour the target
    that runs first. Paired targets are next to each other in ALL.
    """
    return list(started) if round_ % 2 else list(reversed(started))


def still_up(target: Target) -> bool:
    return all(p.popen.poll() is None for p in target.processes) and (
        not target.base or http_ok(target.base + "/v2/health/live")
    )
