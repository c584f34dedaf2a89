"""Smoke test of load_tests/bench_fleet.py: every target serves and both ratios print."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("wrk") is None,
    reason="needs redis-server and wrk (Debian packages redis-server, wrk)",
)
def test_bench_fleet_quick_prints_every_target_and_both_ratios() -> None:
    argv = [sys.executable, "-m", "load_tests.bench_fleet", "--quick"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| 1 \| (\S+) \| (\d+) \| \d+ \| \d+ \| (\d+) \|$", done.stdout, re.M)
    assert {name for name, _, _ in rows} == {"file", "fleet", "workers-1", "workers-2"}, rows
    assert all(int(rate) > 0 and errors == "0" for _, rate, errors in rows), rows
    assert re.search(r"\(a\) fleet / file state.*\| \*\*[\d.]+\*\* \|", done.stdout)
    assert re.search(r"\(b\) `--workers 2` / 1 worker.*\| \*\*[\d.]+\*\* \|", done.stdout)
