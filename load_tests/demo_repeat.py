"""Run `rollguard demo` N times in a row, each in a fresh work directory, and write a table.

    python -m load_tests.demo_repeat --runs 10 [--quick]

Each run is the real CLI in a child process (a fresh registry build, a fresh gateway, a
fresh state directory); a run passes when the command exits 0. The table lists every
run's exit status and duration and the last lines it printed, so a failure can be read
from the file alone. Exit status: 0 when every run passed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "demo_repeat.md"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def run_once(quick: bool, timeout_s: float) -> tuple[int, float, str]:
    """(exit status, seconds, the last lines of output) of one `rollguard demo`."""
    workdir = Path(tempfile.mkdtemp(prefix="rollguard-demo-"))
    command = [sys.executable, "-m", "rollguard.proxy.cli", "demo", "--workdir", str(workdir)]
    if quick:
        command.append("--quick")
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        status = -1
        partial = exc.stdout or ""
        if isinstance(partial, bytes):
            partial = partial.decode(errors="replace")
        output = f"timed out after {timeout_s:.0f} s\n{partial}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    printed = [line.strip() for line in str(output).splitlines() if line.strip()]
    tail = " / ".join(printed[-3:])
    return status, time.perf_counter() - started, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs in a row (default 10)")
    parser.add_argument("--quick", action="store_true", help="the demo's shorter holds")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the table to write")
    parser.add_argument(
        "--commit", default=None, help="the commit to name (default: git rev-parse HEAD here)"
    )
    args = parser.parse_args(argv)
    rows: list[tuple[int, int, float, str]] = []
    for run in range(1, args.runs + 1):
        status, seconds, tail = run_once(args.quick, args.timeout)
        rows.append((run, status, seconds, tail))
        verdict = "pass" if status == 0 else f"FAIL (exit {status})"
        print(f"run {run}/{args.runs}: {verdict} in {seconds:.1f} s", flush=True)
    passed = sum(1 for _, status, _, _ in rows if status == 0)
    total = sum(seconds for _, _, seconds, _ in rows)
    lines = [
        "# `rollguard demo`, run repeatedly",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {args.commit or _commit()}, "
        f"{'--quick' if args.quick else 'full demo'}: **{passed} of {len(rows)} passed** "
        f"in a row, {total / 60:.1f} min in all.",
        "",
        "| run | result | seconds | last lines |",
        "|---:|---|---:|---|",
    ]
    for run, status, seconds, tail in rows:
        result = "pass" if status == 0 else f"fail ({status})"
        lines.append(f"| {run} | {result} | {seconds:.1f} | {tail.replace('|', '/')} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{passed} of {len(rows)} passed; table in {args.out}")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
