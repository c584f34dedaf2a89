"""Where a server's time goes under load: py-spy samples, grouped by what the code is for.

A profile is taken in a separate run after the measured rounds, so sampling never
perturbs the table. Samples are attributed by their innermost frame's file to a few
categories (HTTP server, HTTP client, codec, rollguard logic, executor hand-off, model
compute, event loop), plus the heaviest functions of rollguard's own packages.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_CATEGORIES = (
    ("HTTP client (aiohttp)", ("aiohttp/client", "aiohttp/connector", "aiohttp/payload")),
    ("HTTP server (aiohttp, incl. socket writes)", ("aiohttp/", "multidict/", "yarl/")),
    (
        "HTTP server (rollguard data port, incl. socket writes)",
        ("proxy/protocol", "proxy/wire", "proxy/urls", "httptools"),
    ),
    ("HTTP client (rollguard upstream pool)", ("serving/upstream",)),
    ("V2 codec, JSON, numpy", ("serving/codec", "serving/tensors", "numpy/", "orjson")),
    ("model compute (onnxruntime)", ("onnxruntime/",)),
    ("benchmark's own servers", ("load_tests/bench",)),
    ("executor hand-off, GIL", ("concurrent/futures", "asyncio/futures", "threading.py")),
    ("asyncio (timeouts, tasks)", ("asyncio/",)),
    ("rollguard logic (route, windows, metrics)", ("proxy/", "policy/", "serving/", "prometheus")),
)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def record(py_spy: str, pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Start sampling `pid` for `seconds` into `out` (py-spy's raw collapsed stacks)."""
    argv = [py_spy, "record", "-p", str(pid), "-d", f"{seconds:g}", "-r", "200"]
    argv += ["-f", "raw", "-o", str(out), "--threads", "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _category(file: str, func: str) -> str:
    # The innermost Python frame while uvloop waits in epoll or runs syscalls is whatever
    # started the loop: aiohttp's run_app, asyncio's Runner.run, uvloop.run.
    if (
        func in ("run_app", "_serve", "Runner.run")
        or file.endswith("uvloop/__init__.py")
        or file.endswith("asyncio/runners.py")
    ):
        return "event loop (uvloop: epoll, syscalls)"
    for name, markers in _CATEGORIES:
        if any(m in file for m in markers):
            return name
    return "other"


@dataclass(frozen=True, slots=True)
class Profile:
    samples: int
    threads: dict[str, float]  # thread name -> share of samples
    categories: dict[str, float]  # share of samples by innermost frame
    ours: list[tuple[str, float]]  # rollguard functions, inclusive share

    def lines(self, top: int = 8) -> list[str]:
        threads = ", ".join(f"{n} {s:.0%}" for n, s in self.threads.items())
        cats = ", ".join(f"{n} {s:.0%}" for n, s in self.categories.items() if s >= 0.01)
        ours = ", ".join(f"`{f}` {s:.0%}" for f, s in self.ours[:top])
        return [
            f"  - {self.samples} samples; threads: {threads}",
            f"  - by innermost frame: {cats}",
            f"  - rollguard functions (inclusive): {ours or 'none'}",
        ]


def summarise(raw: Path) -> Profile | None:
    """Group the raw stacks py-spy wrote; None when it wrote nothing."""
    try:
        text = raw.read_text(errors="replace")
    except OSError:
        return None
    threads: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[re.sub(r"^thread \(\d+\): ", "", frames[0]) or "?"] += n
        parsed = [m.groupdict() for f in frames[1:] if (m := _FRAME.match(f))]
        if parsed:
            categories[_category(parsed[-1]["file"], parsed[-1]["func"])] += n
        mine = {
            f"{Path(p['file']).parent.name}/{Path(p['file']).stem}.{p['func']}"
            for p in parsed
            if "site-packages" not in p["file"]
            and not p["file"].endswith("proxy/cli.py")  # the root of every stack
            and re.search(r"(^|/)(proxy|serving|policy)/([^/]+/)?[^/]+\.py$", p["file"])
        }
        for name in mine:
            ours[name] += n
    if not total:
        return None
    return Profile(
        total,
        {k: v / total for k, v in threads.most_common()},
        {k: v / total for k, v in categories.most_common()},
        [(k, v / total) for k, v in ours.most_common()],
    )
