"""The 600 KB binary proxy benchmark runs end to end, and its byte check holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_runs_and_the_upstream_gets_the_clients_bytes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "load_tests.bench_binary_proxy", "--requests", "4",
         "--concurrency", "2", "--rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bytes the client sent: 614,545 (identical)" in done.stdout
