"""Smoke test of load_tests/bench_upstream.py: both clients run against the echo server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_bench_upstream_prints_both_clients_and_the_ratio() -> None:
    argv = [sys.executable, "-m", "load_tests.bench_upstream"]
    argv += ["--requests", "300", "--warmup", "20", "--concurrency", "4", "--loop", "asyncio"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = dict(re.findall(r"^(aiohttp ClientSession|UpstreamPool)\s+(\d+)\s", done.stdout, re.M))
    assert set(rows) == {"aiohttp ClientSession", "UpstreamPool"}, done.stdout
    assert all(int(rate) > 0 for rate in rows.values())
    assert re.search(r"pool vs aiohttp \(best\)\s+[\d.]+x\s+[\d.]+x less CPU", done.stdout)
