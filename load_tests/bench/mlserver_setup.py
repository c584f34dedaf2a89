"""MLServer in its own virtualenv (outside the repository), serving the scikit-learn model.

MLServer pins libraries that rollguard's environment must not inherit, so it lives in
`~/.cache/rollguard-bench/mlserver-venv` (or $ROLLGUARD_BENCH_CACHE), created on first
use. scikit-learn is pinned to the version in this environment, so the joblib file
written here loads there. uvloop is pinned to 0.21: MLServer 1.7.1 with
`parallel_workers: 1` crashes at start under uvloop 0.23; with `parallel_workers: 0`
(used here: inference in the server process, the faster setting on this machine) it
runs under both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sklearn

from load_tests.bench.procs import Process, Processes, free_port

MLSERVER_VERSION = "1.7.1"
UVLOOP_PIN = "uvloop==0.21.0"


def cache_dir() -> Path:
    root = os.environ.get("ROLLGUARD_BENCH_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "rollguard-bench"


def _requirements() -> list[str]:
    return [
        f"mlserver=={MLSERVER_VERSION}",
        f"mlserver-sklearn=={MLSERVER_VERSION}",
        f"scikit-learn=={sklearn.__version__}",
        UVLOOP_PIN,
    ]


def ensure_venv(*, install: bool = True) -> tuple[Path | None, str]:
    """(path of the `mlserver` executable, '') or (None, why it cannot be had)."""
    venv = cache_dir() / "mlserver-venv"
    executable = venv / "bin" / "mlserver"
    stamp = venv / "rollguard-bench-requirements.txt"
    wanted = "\n".join(_requirements())
    if executable.exists() and stamp.exists() and stamp.read_text() == wanted:
        return executable, ""
    if not install:
        return None, f"no MLServer venv at {venv} (and --no-install was given)"
    print(f"installing MLServer {MLSERVER_VERSION} into {venv} (about a minute) ...", flush=True)
    log = cache_dir() / "mlserver-pip.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *_requirements()],
        ]
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, check=False).returncode:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                return None, f"`{' '.join(step[:4])} ...` failed: {tail} (see {log})"
    stamp.write_text(wanted)
    return executable, ""


def version(executable: Path) -> str:
    python = executable.parent / "python"
    code = "import mlserver, uvloop; print(mlserver.__version__, 'uvloop', uvloop.__version__)"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def start(procs: Processes, executable: Path, repository: Path) -> tuple[Process, int]:
    """`mlserver start` on a loopback port; returns the process and its HTTP port."""
    port = free_port()
    settings = {
        "debug": False,  # no access log
        "parallel_workers": 0,
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_endpoint": None,  # no separate metrics server
        "load_models_at_startup": True,
    }
    (repository / "settings.json").write_text(json.dumps(settings))
    process = procs.start("mlserver", [str(executable), "start", str(repository)], cwd=repository)
    return process, port
