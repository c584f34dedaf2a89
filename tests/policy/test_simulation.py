"""The policy benchmark's quick mode: A/A false rollbacks within alpha, 1 % → 2 % caught."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_simulation_controls_false_rollbacks_and_detects_a_regression(
    tmp_path: Path,
) -> None:
    out = tmp_path / "sim.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "load_tests" / "policy_simulation.py"),
            "--quick",
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
    assert "| aa_canary_err0.01 |" in done.stdout
    results = {r["scenario"]: r for r in json.loads(out.read_text())}
    aa, power = results["aa_canary_err0.01"], results["power_err_1to2"]
    for res in (aa, power):
        assert res["misses"] == 0 and res["audited_looks"] > 0
    for row in aa["rows"]:
        assert row["replicates"] >= 300
        if row["kind"] == "rollback":  # consistent with a false-rollback rate of at most alpha
            assert row["wilson_low"] <= aa["alpha"]
    detected = {r["cadence"]: r for r in power["rows"] if r["kind"] == "rollback"}
    assert detected[100]["rate"] > 0.5
    assert detected[10]["fails"] >= detected[100]["fails"] >= detected[1000]["fails"]
    assert detected[100]["median_candidate_requests"] > 0
