"""The sidecar's own cost: resident memory idle and after load, start-to-ready, install size.

`python -m load_tests.bench --footprint` measures, for two gateways started as
`rollguard serve` is:

- proxy-only: one `framework: http` version in front of bare (what a sidecar runs);
- demo models: the benchmark's in-process ONNX versions (what `rollguard demo` serves).

For each: the time from spawning the process to `GET /v2/health/ready` answering 200
(median of `starts` starts, polled every 10 ms), VmRSS once ready and idle for 2 s, and
VmRSS and VmHWM (its peak) after `load_s` seconds of wrk at 32 connections. The installed
size of a proxy-only install is the size on disk of every file of the distributions a
plain `pip install rollguard` pulls in (no extras: the core's requirements, followed
through their own), read from this environment's package metadata; the `onnx` extra is
listed beside it.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from load_tests.bench import models, wrk
from load_tests.bench.procs import Process, Processes, free_port, http_ok
from load_tests.bench.targets import INFER, REPO, ROLLGUARD_ENV


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def _requirement_name(requirement: str) -> tuple[str, str]:
    """(distribution name, environment marker text) of a Requires-Dist line."""
    spec, _, marker = requirement.partition(";")
    name = re.split(r"[\s\[<>=!~(]", spec.strip(), maxsplit=1)[0]
    return name, marker


def closure(root: str, extras: tuple[str, ...] = ()) -> set[str]:
    """The installed distributions `root` (with `extras`) needs, itself included."""
    seen: set[str] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen and not wanted:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(key)
        for requirement in dist.requires or []:
            dep, marker = _requirement_name(requirement)
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
            if extra is not None and extra.group(1) not in wanted:
                continue
            if "sys_platform == 'win32'" in marker.replace('"', "'"):
                continue
            sub = re.search(r"\[([^\]]+)\]", requirement.partition(";")[0])
            subextras = tuple(e.strip() for e in sub.group(1).split(",")) if sub else ()
            if dep.lower().replace("_", "-") == key:  # rollguard[onnx,...] inside rollguard
                todo.append((dep, subextras))
                continue
            if dep.lower().replace("_", "-") not in seen:
                todo.append((dep, subextras))
    return seen


def installed_bytes(names: set[str]) -> int:
    total = 0
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for file in dist.files or []:
            path = Path(str(dist.locate_file(file)))
            try:
                total += path.stat().st_size
            except OSError:
                continue
    return total


def _start(
    procs: Processes, name: str, registry: Path, work: Path, ready_url: str, port: int
) -> tuple[Process, float]:
    admin = free_port()
    argv = [sys.executable, "-m", "rollguard.proxy.cli", "serve", "--port", str(port)]
    argv += ["--admin-port", str(admin), "--registry", str(registry)]
    argv += ["--policies", str(models.policies(work, None)), "--state", str(work / f"st-{name}")]
    began = time.monotonic()
    env = {**ROLLGUARD_ENV, "ROLLGUARD_GRPC_PORT": str(free_port())}  # gRPC on, as by default
    process = procs.start(name, argv, env=env, cwd=REPO)
    deadline = began + 120
    while not http_ok(ready_url):
        if process.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} never became ready:\n{process.log_tail()}")
        time.sleep(0.01)
    return process, time.monotonic() - began


def _gateway(
    procs: Processes,
    name: str,
    registry: Path,
    work: Path,
    *,
    starts: int,
    load_s: float,
    wrk_path: str | None,
    log: Callable[[str], None],
) -> dict[str, float]:
    times = []
    for i in range(starts):
        port = free_port()
        process, took = _start(procs, f"{name}-{i}", registry, work, _ready(port), port)
        times.append(took)
        if i < starts - 1:
            process.stop()
    time.sleep(2.0)
    idle, _ = rss_kib(process.popen.pid)
    found = {"start_to_ready_s": statistics.median(times), "rss_idle_mib": idle / 1024}
    if wrk_path is not None and load_s > 0:
        url = f"http://127.0.0.1:{port}{INFER}"
        result = wrk.run(
            wrk_path,
            url,
            models.request_body(),
            key_header=models.KEY_HEADER,
            connections=32,
            threads=1,
            duration_s=load_s,
        )
        rss, peak = rss_kib(process.popen.pid)
        found |= {"rss_loaded_mib": rss / 1024, "rss_peak_mib": peak / 1024, "load_rps": result.rps}
    process.stop()
    log(f"footprint {name}: " + ", ".join(f"{k} {v:,.2f}" for k, v in found.items()))
    return found


def _ready(port: int) -> str:
    return f"http://127.0.0.1:{port}/v2/health/ready"


def measure(
    procs: Processes,
    work: Path,
    demo: Path,
    upstream: str,
    *,
    load_s: float,
    wrk_path: str | None,
    log: Callable[[str], None],
    starts: int = 3,
) -> dict[str, Any]:
    """Both gateways' figures and the install sizes (MiB)."""
    proxy = models.http_registry(demo, work, "registry-footprint", {models.STABLE: upstream})
    local = models.inprocess_registry(demo, work)
    core = closure("rollguard")
    onnx = closure("rollguard", ("onnx",)) - core
    return {
        "proxy_only": _gateway(
            procs, "fp-proxy", proxy, work, starts=starts, load_s=load_s, wrk_path=wrk_path, log=log
        ),
        "demo_models": _gateway(
            procs, "fp-demo", local, work, starts=starts, load_s=load_s, wrk_path=wrk_path, log=log
        ),
        "install": {
            "proxy_only_mib": installed_bytes(core) / 2**20,
            "proxy_only_distributions": sorted(core),
            "onnx_extra_mib": installed_bytes(onnx) / 2**20,
            "onnx_extra_distributions": sorted(onnx),
        },
        "load_s": load_s,
        "starts": starts,
    }


def lines(found: dict[str, Any]) -> list[str]:
    """The footprint section of bench.md, with the issue's two goals judged."""
    proxy, demo, install = found["proxy_only"], found["demo_models"], found["install"]
    rows = [
        "## Sidecar footprint",
        "",
        f"`--footprint`: start-to-ready is the median of {found['starts']} starts (spawn to "
        "`/v2/health/ready` 200); RSS idle 2 s after ready; after load: "
        f"{found['load_s']:g} s of wrk at 32 connections. Installed size: every file of the "
        "distributions `pip install rollguard` (no extras) pulls in, from this environment's "
        "package metadata.",
        "",
        "| gateway | start-to-ready s | RSS idle MiB | RSS after load MiB | peak RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for name, figures in (("proxy-only (one http version)", proxy), ("demo models", demo)):
        rows.append(
            f"| {name} | {figures['start_to_ready_s']:.2f} | {figures['rss_idle_mib']:.0f} | "
            f"{figures.get('rss_loaded_mib', float('nan')):.0f} | "
            f"{figures.get('rss_peak_mib', float('nan')):.0f} |"
        )
    rows += [
        "",
        f"- proxy-only install: {install['proxy_only_mib']:.0f} MiB "
        f"({len(install['proxy_only_distributions'])} distributions: "
        f"{', '.join(install['proxy_only_distributions'])}); the onnx extra adds "
        f"{install['onnx_extra_mib']:.0f} MiB ({', '.join(install['onnx_extra_distributions'])})",
        f"- proxy-only RSS idle {proxy['rss_idle_mib']:.0f} MiB (goal <= 80): "
        + ("met" if proxy["rss_idle_mib"] <= 80 else "NOT MET"),
        f"- proxy-only start-to-ready {proxy['start_to_ready_s']:.2f} s (goal <= 1.5): "
        + ("met" if proxy["start_to_ready_s"] <= 1.5 else "NOT MET"),
    ]
    return rows
