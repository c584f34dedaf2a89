"""`python -m load_tests.bench`: every target side by side in one run, one table in results/.

Starts bare, rollguard (in-process and proxy mode), a naive proxy, nginx and MLServer on
loopback ports, installs what is missing where it can (wrk and nginx with apt-get,
MLServer in its own venv) and skips with a printed reason what it cannot have. Rounds
are interleaved (each round runs every target once, in reverse order every other round)
so that a shared machine's disturbances spread over all targets; the figures are
medians over rounds. Two more
rollguard targets serve a compute-heavy MLP without and with micro-batching, always at
64 connections, for the issue's batching goal.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

from load_tests.bench import client, footprint, latency, models, profile, report, targets, wrk
from load_tests.bench.procs import Processes, cpu_delta, cpu_seconds, process_tree
from load_tests.bench.tools import Tool, locate

RESULTS = Path(__file__).resolve().parents[1] / "results"
PROFILED = ("bare", "rollguard", "rollguard-shadow", "rollguard-proxy", "rollguard-proxy-shadow")


def log(message: str) -> None:
    print(message, flush=True)


def measure(
    target: targets.Target, body: bytes, args: argparse.Namespace, tool: Tool
) -> dict[str, float]:
    """One run: load for `duration` seconds; CPU of the target's process trees meanwhile.

    `body` and --connections unless the target brings its own (the MLP targets)."""
    body = target.body if target.body is not None else body
    connections = target.connections or args.connections

    def load(seconds: float) -> client.LoadResult:
        if tool.path is not None:
            return wrk.run(
                tool.path,
                target.url,
                body,
                key_header=models.KEY_HEADER,
                connections=connections,
                threads=args.threads,
                duration_s=seconds,
            )
        return asyncio.run(
            client.closed_loop(
                target.url,
                body,
                connections=connections,
                duration_s=seconds,
                headers=client.user_headers(models.KEY_HEADER),
            )
        )

    if args.warmup > 0:
        load(args.warmup)
    roots = [p.pid for p in target.processes]
    copies = latency.shadow_counts(target)
    before = cpu_seconds(process_tree(roots))
    result = load(args.duration)
    after = cpu_seconds(set(process_tree(roots)) | set(before))
    cpu = cpu_delta(before, after)
    mirrored = latency.shadow_figures(
        copies, latency.shadow_counts(target), result.requests, result.duration_s
    )
    return mirrored | {
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p95_ms": result.p95_ms,
        "p99_ms": result.p99_ms,
        "cpu_s_per_1k": cpu / result.requests * 1000 if result.requests else float("nan"),
        "cpu_s": cpu,
        "requests": result.requests,
        "errors": result.errors,
        "connections": connections,
    }


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError as exc:
        return f"unavailable: {exc}"


def rollguard_notes(target: targets.Target) -> dict[str, object]:
    """The rollout's phase and weight after the runs, and shadow results from /metrics."""
    if not target.admin:
        return {}
    notes: dict[str, object] = {}
    metrics = _get(target.admin + "/metrics")
    shadow = re.findall(
        r'rollguard_shadow_requests_total\{[^}]*result="(\w+)"[^}]*\} (\S+)', metrics
    )
    if shadow:
        notes["shadow_requests"] = {result: float(n) for result, n in shadow}
    rollouts = _get(target.admin + "/admin/rollouts")
    found = re.search(r'"phase":"(\w+)".*?"weight":([\d.]+)', rollouts)
    if found:
        notes["rollout"] = {"phase": found.group(1), "weight": float(found.group(2))}
    return notes


def profile_runs(
    started: list[targets.Target],
    rows: dict[str, report.Row],
    body: bytes,
    args: argparse.Namespace,
    tool: Tool,
    work: Path,
) -> None:
    """One more run per profiled target with py-spy sampling its front process."""
    py_spy = profile.find_py_spy()
    if py_spy is None:
        log("profiles skipped: py-spy is not installed (pip install py-spy)")
        return
    quiet = argparse.Namespace(**{**vars(args), "warmup": 0.0})
    for target in started:
        if target.name not in PROFILED or not rows[target.name].runs:
            continue
        raw = work / f"profile-{target.name}.txt"
        sampler = profile.record(py_spy, target.processes[0].pid, args.duration - 1, raw)
        measure(target, body, quiet, tool)
        sampler.wait(30)
        summary = profile.summarise(raw)
        if summary is None:
            log(f"profile of {target.name}: py-spy recorded nothing (ptrace not permitted?)")
            continue
        rows[target.name].notes["profile"] = summary.lines()
        log(f"profile of {target.name}:\n" + "\n".join(summary.lines()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m load_tests.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--targets", default=",".join(targets.ALL), help="comma-separated subset")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where bench.md/json go")
    parser.add_argument("--no-install", action="store_true", help="never apt-get or pip install")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temp dir)")
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the py-spy runs after the rounds"
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite bench.md from --out's bench.json"
    )
    parser.add_argument(
        "--open-rounds",
        type=int,
        default=None,
        help="open-loop rounds at 50 %% and 80 %% of bare's capacity, and the shadows at 50 %% of "
        "their no-shadow twin's (default: --rounds; 0: none)",
    )
    parser.add_argument("--open-duration", type=float, default=8.0, help="seconds per open run")
    parser.add_argument(
        "--footprint",
        action="store_true",
        help="also measure RSS, start-to-ready and installed size (load_tests/bench/footprint.py)",
    )
    parser.add_argument("--footprint-load", type=float, default=60.0, help="seconds of load")
    args = parser.parse_args(argv)
    if args.render:
        md, _ = report.rerender(args.out)
        log(f"wrote {md}")
        return 0
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    install = not args.no_install

    wrk_tool = locate("wrk", "wrk", install=install)
    if wrk_tool.path is None:
        log(
            f"wrk unavailable ({wrk_tool.reason}): falling back to the aiohttp client, "
            "which is slower than the servers it measures"
        )
    wanted_nginx = any(n.startswith("nginx") for n in names)
    nginx_tool = (
        locate("nginx", "nginx-light", install=install)
        if wanted_nginx
        else Tool("nginx", None, "not requested")
    )

    with tempfile.TemporaryDirectory(prefix="rollguard-bench-") as scratch:
        work = args.workdir or Path(scratch)
        log(f"building the demo models in {work} ...")
        demo = models.build_demo(work)
        body = models.request_body()
        with Processes(work / "logs") as procs:
            lab = targets.Lab(procs, work, demo, nginx_tool, install=install)
            started = lab.start(names, log)
            rows = {t.name: report.Row(t.name, t.about) for t in started}
            for round_ in range(1, args.rounds + 1):
                for target in targets.round_order(started, round_):
                    if not targets.still_up(target):
                        lab.skipped.setdefault(target.name, "a server process died during the run")
                        continue
                    figures = measure(target, body, args, wrk_tool)
                    rows[target.name].runs.append(figures)
                    log(
                        f"round {round_} {target.name:<24} {figures['rps']:>8.0f} req/s  "
                        f"p50 {figures['p50_ms']:6.2f}  p99 {figures['p99_ms']:6.2f} ms  "
                        f"CPU {figures['cpu_s_per_1k']:.3f} s/1k  errors {figures['errors']:.0f}"
                    )
            open_runs: list[latency.OpenRun] = []
            open_rounds = args.rounds if args.open_rounds is None else args.open_rounds
            if open_rounds and "bare" in rows and rows["bare"].runs:
                # The slowest round's: on a shared machine a rate set from the median
                # can overload every target in a slower minute, which says nothing about
                # what a proxy adds at a normal load.
                open_runs = latency.open_rounds(
                    started,
                    {
                        name: min(run["rps"] for run in row.runs)
                        for name, row in rows.items()
                        if row.runs
                    },
                    rounds=open_rounds,
                    duration_s=args.open_duration,
                    log=log,
                    alive=targets.still_up,
                )
            for target in started:
                rows[target.name].notes = rollguard_notes(target)
            if not args.no_profile:
                profile_runs(started, rows, body, args, wrk_tool, work)
            sizes: dict[str, object] = {}
            if args.footprint:
                a_base = lab.bare("a")[1]
                sizes = footprint.measure(
                    procs,
                    work,
                    demo,
                    a_base,
                    load_s=args.footprint_load,
                    wrk_path=wrk_tool.path,
                    log=log,
                )
        done = [r for r in rows.values() if r.runs]
        tools = {"wrk": wrk_tool.version(), "nginx": nginx_tool.version(), **lab.versions}
        settings = {
            "rounds": args.rounds,
            "order": "alternating",  # targets.round_order
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "mlp_connections": targets.MLP_CONNECTIONS,
            "wrk_threads": args.threads,
            "client": "wrk" if wrk_tool.path else "aiohttp closed loop (wrk missing)",
            "rollguard": "config/rollguard.yaml defaults, log_level WARNING",
        }
        host = report.machine(tools)
        print()
        print(report.table(done))
        print()
        print("\n".join(report.goal_lines(report.goals(done))))
        for name, why in lab.skipped.items():
            print(f"skipped {name}: {why}")
        md, js = report.write(
            args.out,
            done,
            settings | {"open_rounds": open_rounds, "open_duration_s": args.open_duration},
            host,
            lab.skipped,
            open_loop=[asdict(r) for r in open_runs],
            footprint=sizes,
        )
        log(f"\nwrote {md} and {js}")
    return 0


if __name__ == "__main__":
    started_at = time.monotonic()
    code = main()
    log(f"done in {time.monotonic() - started_at:.0f} s")
    sys.exit(code)
