"""The policy simulation (load_tests/policy_simulation.py) runs, and the README's example
policy promotes a healthy candidate through the real rollout controller.

The smoke test asserts only that the quick run completes and that its tables have every
row: one short replicate per scenario makes no statistical claim (the full run's results are
in load_tests/results/policy_simulation.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from load_tests.policy_simulation import readme_policy, scenarios
from load_tests.sim_gateway import TERMINAL, Traffic, run_replicate

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_quick_simulation_runs_and_reports_every_row(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "load_tests" / "policy_simulation.py"),
            "--quick",
            "--workers",
            "2",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {
        line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")
    }
    labels = {"defaults", "readme", "shipped"}
    for sc in scenarios():
        shown = sc.label if sc.kind in ("promoted", "healthy") else sc.name
        assert shown in rows, f"no row for {sc.name}"
    assert labels <= rows
    for table in ("### A/A", "### Power", "### Regressions promoted", "### Healthy canaries"):
        assert table in done.stdout
    doc = json.loads(out.read_text())
    assert doc["quick"] is True
    ran = {s["scenario"]: s["replicates"] for s in doc["scenarios"]}
    assert set(ran) == {sc.name for sc in scenarios()}
    for replicates in ran.values():
        assert len(replicates) == 1
        assert all(r["end"] in (*TERMINAL, "running") for r in replicates)


@pytest.mark.slow
def test_the_readme_example_policy_promotes_a_healthy_candidate() -> None:
    """README.md's example, as written there, through the real shell on a simulated clock:
    both versions alike at 500 req/s, for up to 10 simulated minutes (its steps hold 3)."""
    out = run_replicate(readme_policy(), Traffic(rate=500.0), 300_000, seed=11)
    assert out.end == "promoted", out.reason
