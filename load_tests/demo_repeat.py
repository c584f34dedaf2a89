"""Run `rollguard demo` N times in a row, each in a fresh work directory, and write a table.

    python -m load_tests.demo_repeat --runs 10 [--busy-cores 1] [--append]

Each run is the real CLI in a child process (a fresh registry build, a fresh gateway, a
fresh state directory); a run passes when the command exits 0. The table lists every
run's exit status and duration, each act's outcome and the last line it printed, so a
failure can be read from the file alone. `--busy-cores N` runs the series beside N
processes that each burn a core (a noisy neighbour); `--append` adds the table to the
file instead of replacing it. Exit status: 0 when every run passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "demo_repeat.md"


def current_commit() -> str:
    """The short hash of HEAD here, or \"unknown\" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def run_once(timeout_s: float) -> tuple[int, float, str]:
    """(exit status, seconds, each act's outcome and the last line) of one `rollguard demo`."""
    workdir = Path(tempfile.mkdtemp(prefix="rollguard-demo-"))
    command = [sys.executable, "-m", "rollguard.proxy.cli", "demo", "--workdir", str(workdir)]
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
    printed = [line.strip() for line in str(output).splitlines() if line.strip()]
    outcomes = [line for line in printed if line.startswith("->")]
    tail = " / ".join([*outcomes, *printed[-1:]])
    if status == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    else:  # kept to be read: what it printed, the gateway's log, the state, the audit log
        (workdir / "demo-output.txt").write_text(str(output), encoding="utf-8")
        tail += f" (kept: {workdir})"
    return status, time.perf_counter() - started, tail


def _burners(n: int) -> list[subprocess.Popen[bytes]]:
    """`n` processes that each keep a core busy until killed."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs in a row (default 10)")
    parser.add_argument(
        "--busy-cores", type=int, default=0, help="processes burning a core each meanwhile"
    )
    parser.add_argument("--append", action="store_true", help="add to --out, not replace it")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the table to write")
    parser.add_argument(
        "--commit", default=None, help="the commit to name (default: git rev-parse HEAD here)"
    )
    args = parser.parse_args(argv)
    rows: list[tuple[int, int, float, str]] = []
    burners = _burners(args.busy_cores)
    try:
        for run in range(1, args.runs + 1):
            status, seconds, tail = run_once(args.timeout)
            rows.append((run, status, seconds, tail))
            verdict = "pass" if status == 0 else f"FAIL (exit {status})"
            print(f"run {run}/{args.runs}: {verdict} in {seconds:.1f} s", flush=True)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    passed = sum(1 for _, status, _, _ in rows if status == 0)
    total = sum(seconds for _, _, seconds, _ in rows)
    beside = f" beside {args.busy_cores} busy core(s)" if args.busy_cores else ""
    lines = [
        f"# `rollguard demo`, run repeatedly{beside}",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {args.commit or current_commit()}, "
        f"{os.cpu_count()} cores{beside}: **{passed} of {len(rows)} passed** "
        f"in a row, {total / 60:.1f} min in all.",
        "",
        "| run | result | seconds | last lines |",
        "|---:|---|---:|---|",
    ]
    for run, status, seconds, tail in rows:
        result = "pass" if status == 0 else f"fail ({status})"
        lines.append(f"| {run} | {result} | {seconds:.1f} | {tail.replace('|', '/')} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if args.append and args.out.exists():
        text = args.out.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + text
    args.out.write_text(text, encoding="utf-8")
    print(f"{passed} of {len(rows)} passed; table in {args.out}")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
