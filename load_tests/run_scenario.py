"""Run one load scenario against a real gateway process; write its JSON report and PNG plot.

    python -m load_tests.run_scenario load_tests/scenarios/canary-bad-candidate.yaml \
        [--quick] [--registry DIR] [--out DIR] \
        [--model NAME] [--inputs FILE] [--input-name NAME] [--key header:NAME|cookie:NAME|none]

Builds the demo registry (once, cached in the temp directory) unless --registry names
one, links the scenario's versions into a scratch registry, starts `rollguard serve` on
free loopback ports (data and admin) with a scratch state directory, polls the admin
port's GET /admin/rollouts every 0.5 s while the load runs, then reads the rollout, its
audit entries and the gateway's health, and stops the gateway whatever happened. Exit
status 0 when the scenario's expectation is met, 1 when it is not, 2 when the run
itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from load_tests.inputs import ENV, Inputs, InputsError, Target, parse_key, read_inputs
from load_tests.loadgen import LoadResult, Workload, run_closed, run_open, v2_bodies
from load_tests.report import Poll, build_report, plot, write_json
from load_tests.scenario import Scenario, ScenarioError, check_expectations, load_scenario
from rollguard.proxy.process import GatewayExited, GatewayProcess
from rollguard.proxy.routing import KeySource

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "load_tests" / "results"
CACHED_REGISTRY = Path(tempfile.gettempdir()) / "rollguard-load-registry"
POLL_S = 0.5
READY_S = 90.0
_FRAMEWORK_OF = {"fraud": "sklearn", "fraud-onnx": "onnx", "fraud-torch": "torch", "digits": "onnx"}


class RunError(Exception):
    """The run could not be carried out (as opposed to an expectation not met)."""


def link_registry(models: Sequence[str], source: Path | None, root: Path) -> Path:
    """A registry at root/registry holding links to the scenario's versions of `source`."""
    if source is None:
        from rollguard.serving.demo.build import build_demo_registry

        source = CACHED_REGISTRY
        frameworks = sorted({_FRAMEWORK_OF.get(m.split("/")[0], "sklearn") for m in models})
        build_demo_registry(source, frameworks=frameworks)
    registry = root / "registry"
    for item in models:
        model, _, version = item.partition("/")
        target = (source / model / version).resolve()
        if not (target / "model.yaml").is_file():
            raise RunError(f"{item}: no such version in registry {source}")
        (registry / model).mkdir(parents=True, exist_ok=True)
        (registry / model / version).symlink_to(target)
    return registry


def start_gateway(scenario: Scenario, registry: Path, work: Path, log: Path) -> GatewayProcess:
    policies, state = work / "policies", work / "state"
    policies.mkdir()
    if scenario.policy is not None:
        (policies / f"{scenario.name}.yaml").write_text(scenario.policy, encoding="utf-8")
    # The scenario alone decides the settings: no ROLLGUARD_* leaks in from this shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLGUARD_")}
    env |= {f"ROLLGUARD_{k.upper()}": str(v) for k, v in scenario.gateway.items()}
    env.setdefault("ROLLGUARD_LOG_LEVEL", "WARNING")
    return GatewayProcess(
        registry=registry, policies=policies, state=state, log=log, env=env, cwd=REPO
    )


async def _get(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Any:
    async with http.get(url, headers=headers) as r:
        if r.status != 200:
            raise RunError(f"GET {url}: {r.status} {await r.text()}")
        return await r.json()


def _workload(scenario: Scenario, url: str) -> Workload:
    t = scenario.target
    if t.inputs is not None:
        inputs = read_inputs(t.inputs, t.input_name)
    elif t.model == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        rows = np.asarray(x, dtype=np.float32)
        inputs = Inputs(v2_bodies(rows, t.input_name), [int(v) for v in y])
    else:
        inputs = Target(input_name=t.input_name).read()  # the demo's evaluation rows
    key = parse_key(t.key) if t.key is not None else KeySource("header", t.user_header)
    feedback = scenario.feedback
    return Workload(
        url=f"{url}/v2/models/{t.model}/infer",
        bodies=inputs.bodies,
        labels=inputs.labels,
        users=t.users if key is not None else 0,
        user_header=key.name if key is not None else t.user_header,
        user_cookie=key.name if key is not None and key.kind == "cookie" else None,
        feedback_url=(
            f"{url}/v2/models/{t.model}/feedback"
            if feedback.enabled and inputs.labels is not None
            else None
        ),
        feedback_delay_s=feedback.delay,
        feedback_fraction=feedback.fraction,
        timeout_s=scenario.load.timeout,
    )


def with_target(scenario: Scenario, options: dict[str, Any], environ: dict[str, str]) -> Scenario:
    """The scenario with its target's model, inputs, input name and key taken from options,
    else from ROLLGUARD_LOAD_* in the environment, else kept as the scenario file has them."""
    update: dict[str, Any] = {}
    for name in ("model", "inputs", "input_name", "key"):
        value = options.get(name) or environ.get(ENV[name]) or None
        if value is not None:
            update[name] = Path(value) if name == "inputs" else value
    if "key" in update:
        parse_key(update["key"])
    if options.get("users") is not None:
        update["users"] = options["users"]
    if not update:
        return scenario
    return scenario.model_copy(update={"target": scenario.target.model_copy(update=update)})


async def drive(scenario: Scenario, gateway: GatewayProcess) -> dict[str, Any]:
    """Wait for the gateway, run the load while polling the rollout, collect the outcome."""
    name = scenario.rollout.name if scenario.rollout else None
    url, admin = gateway.url, gateway.admin_url
    auth = gateway.admin_headers  # GatewayProcess made a token for this run
    polls: list[Poll] = []  # `at` on the monotonic clock until the load's t0 is known
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        try:
            await gateway.wait_ready(http, READY_S)
        except GatewayExited as exc:
            raise RunError(str(exc)) from None

        async def poll_once() -> None:
            for r in (await _get(http, f"{admin}/admin/rollouts", auth))["rollouts"]:
                if r["name"] == name:
                    at = time.monotonic()
                    polls.append(Poll(at, r["phase"], float(r["weight"]), int(r["step"])))

        async def poller() -> None:
            while True:
                # An overloaded gateway may miss a poll; the timeline shows the gap.
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, RunError):
                    await poll_once()
                await asyncio.sleep(POLL_S)

        expected, settle = scenario.expect.phase, scenario.settle
        expected_name = expected.value if expected is not None else None

        def stop() -> bool:
            """Once the expected phase is seen, run `settle` seconds more (quick runs)."""
            seen = next((p.at for p in polls if p.phase == expected_name), None)
            return settle is not None and seen is not None and time.monotonic() > seen + settle

        polling = asyncio.get_running_loop().create_task(poller()) if name else None
        workload, load = _workload(scenario, url), scenario.load
        try:
            result: LoadResult
            if load.mode == "open":
                result = await run_open(
                    workload, load.rate_phases, max_inflight=load.max_inflight, stop=stop
                )
            else:
                result = await run_closed(
                    workload, connections=load.connections, duration_s=load.duration, stop=stop
                )
        finally:
            if polling is not None:
                polling.cancel()
                await asyncio.gather(polling, return_exceptions=True)
        detail, audit = None, []
        if name:
            await poll_once()
            detail = await _get(http, f"{admin}/admin/rollouts/{name}", auth)
            audit = (await _get(http, f"{admin}/admin/audit?rollout={name}", auth))["entries"]
        try:
            async with http.get(f"{url}/v2/health/live") as r:
                alive = r.status == 200
        except aiohttp.ClientError:
            alive = False
    polls = [Poll(p.at - result.started, p.phase, p.weight, p.step) for p in polls]
    return build_report(scenario.name, result, polls=polls, audit=audit, detail=detail, alive=alive)


def run(scenario: Scenario, *, registry: Path | None, out: Path, quick: bool) -> dict[str, Any]:
    """Run the scenario; write report.json and plot.png under `out`; return the report."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"rollguard-{scenario.name}-") as scratch:
        work = Path(scratch)
        linked = link_registry(scenario.models, registry, work)
        gateway = start_gateway(scenario, linked, work, out / "gateway.log")
        try:
            report = asyncio.run(drive(scenario, gateway))
        finally:
            gateway.stop(15.0)
    report["quick"] = quick
    report["expect"] = scenario.expect.model_dump(mode="json")
    report["failures"] = check_expectations(scenario.expect, report)
    report["passed"] = not report["failures"]
    write_json(report, out / "report.json")
    plot(report, out / "plot.png")
    return report


def _summary(report: dict[str, Any]) -> str:
    lines = [f"scenario {report['scenario']}: {'PASS' if report['passed'] else 'FAIL'}"]
    rollout = report.get("rollout") or {}
    if rollout:
        lines.append(
            f"  rollout {rollout['name']}: phase {rollout['phase']}, weight "
            f"{rollout['weight']:g}, first seen {rollout['first_seen']}"
        )
    o = report["overall"]
    lines.append(
        f"  {report['load']['arrivals']} arrivals, statuses {report['statuses']}, "
        f"dropped {report['load']['dropped_by_client']}, {o['throughput_rps']} rps, "
        f"p50/p95/p99 {o['latency_ms']['p50']}/{o['latency_ms']['p95']}/"
        f"{o['latency_ms']['p99']} ms"
    )
    for version, v in report["variants"].items():
        lines.append(
            f"  {version}: {v['requests']} answers, error rate {v['error_rate']}, "
            f"p99 {v['latency_ms']['p99']} ms"
        )
    lines += [
        f"  decision at {d['t']:.1f}s: {d['action']} ({d['reason']})" for d in report["decisions"]
    ]
    lines += [f"  FAILED: {f}" for f in report["failures"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.run_scenario", description=__doc__)
    parser.add_argument("scenario", type=Path, help="a scenario YAML file")
    parser.add_argument("--quick", action="store_true", help="the short version, stopped once met")
    parser.add_argument("--registry", type=Path, help="a registry holding the demo versions")
    parser.add_argument("--out", type=Path, help="output directory (default results/<name>/)")
    target = parser.add_argument_group(
        "target", "override the scenario's target (each also from ROLLGUARD_LOAD_<NAME>)"
    )
    target.add_argument("--model", help="the model to infer on")
    target.add_argument(
        "--inputs", type=Path, help="your requests: .jsonl/.json V2 bodies, .npy, .npz, .csv"
    )
    target.add_argument("--input-name", help="tensor name for .npy/.npz/.csv rows")
    target.add_argument("--key", help="stickiness key: header:NAME, cookie:NAME or none")
    target.add_argument("--users", type=int, help="distinct sticky keys to send")
    args = parser.parse_args(argv)
    try:
        scenario = with_target(load_scenario(args.scenario), vars(args), dict(os.environ))
        if args.quick:
            scenario = scenario.quick_version()
        out = args.out or RESULTS / scenario.name
        report = run(scenario, registry=args.registry, out=out, quick=args.quick)
    except (ScenarioError, RunError, InputsError, OSError) as exc:
        print(f"run_scenario: {exc}", file=sys.stderr)
        return 2
    print(_summary(report))
    print(f"  report {out / 'report.json'}, plot {out / 'plot.png'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
