"""The gRPC vs REST benchmark runs end to end (tiny; no speed is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_runs_and_reports_its_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench_grpc.md"
    done = subprocess.run(
        [sys.executable, "-m", "load_tests.bench_grpc", "--requests", "5",
         "--concurrency", "2", "--rounds", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = out.read_text()
    assert "| 1 |" in report and "Median gateway CPU per request: gRPC" in report
