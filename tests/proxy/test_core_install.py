"""A proxy-only install: the core serves `framework: http` with no model runtime importable.

The core distribution (`pip install rollguard`, no extras) has no onnxruntime,
scikit-learn, skops, joblib, torch or scipy. Here they are made unimportable in a child process
(a finder first on sys.meta_path answers ModuleNotFoundError, as when not installed) and the real
`rollguard serve` is started on a registry holding an http version and an ONNX and a
scikit-learn one: the http version serves, the local ones are refused with the extra to
install, and the gateway runs on; a policy's sample-ratio check runs without scipy and
a drift check is refused naming its extra. A gateway serving only an http version, from start to
exit, imports none of the heavy libraries it has no use for (its memory at idle).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.proxy.support import write_remote_version
from tests.serving.support import eventually

REPO = Path(__file__).resolve().parents[2]
RUNTIMES = ("onnxruntime", "sklearn", "skops", "joblib", "torch", "onnx", "skl2onnx")
NOT_IN_THE_CORE = (*RUNTIMES, "scipy")  # scipy: the drift extra
_CHILD = f"""
import sys


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {NOT_IN_THE_CORE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
from rollguard.proxy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_core_requires_no_model_runtime() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    for runtime in ("onnxruntime", "scikit-learn", "skops", "torch"):
        assert runtime not in core
    extras = project["optional-dependencies"]
    assert extras["all"] == ["rollguard[onnx,sklearn,torch,drift]"]
    assert "scipy" not in core  # the drift extra: 136 MiB a proxy-only install does without
    assert extras["drift"] == ["scipy>=1.11"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            status: int = answer.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class _Upstream(BaseHTTPRequestHandler):
    """A V2 model server: ready, and every row's answer is the sum of its two features."""

    def do_GET(self) -> None:
        self._answer(200, {"ready": True})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        (x,) = body["inputs"]
        sums = [a + b for a, b in zip(x["data"][::2], x["data"][1::2], strict=True)]
        out = {"name": "y", "datatype": "FP32", "shape": [len(sums), 1], "data": sums}
        self._answer(200, {"model_name": "remote", "outputs": [out]})

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v2/models/remote"
    server.shutdown()
    server.server_close()
    thread.join()


def _sum_via(base: str, headers: dict[str, str] | None = None) -> list[float]:
    """The gateway's answer to one request for the remote model (two rows)."""
    row = {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}
    request = urllib.request.Request(
        f"{base}/remote/infer",
        data=json.dumps({"inputs": [row]}).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        (output,) = json.loads(answer.read())["outputs"]
    data: list[float] = output["data"]
    return data


def _serve(
    script: str, tmp_path: Path, registry: Path, policies: Path, *options: str, **env: str
) -> tuple[subprocess.Popen[str], int, int]:
    """`rollguard serve` run by `script` in a child (admin without auth): the process,
    its data port and its admin port."""
    port, admin_port = _free_port(), _free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--registry", str(registry),
         "--policies", str(policies), "--state", str(tmp_path / "state"),
         "--port", str(port), "--admin-port", str(admin_port), *options],
        env={**os.environ, "ROLLGUARD_ADMIN_AUTH": "none", **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )  # fmt: skip
    return process, port, admin_port


def _stopped(process: subprocess.Popen[str]) -> str:
    """Terminate the child gateway; its output once it has exited."""
    process.terminate()
    output: str = process.communicate(timeout=30)[0]
    return output


def test_serve_without_model_runtimes(tmp_path: Path, demo_registry: Path, upstream: str) -> None:
    registry = tmp_path / "registry"
    for model in ("fraud-onnx", "fraud"):  # ONNX and scikit-learn (skops) versions
        shutil.copytree(demo_registry / model / "1.0.0", registry / model / "1.0.0")
    write_remote_version(registry, "1", upstream)
    (tmp_path / "policies").mkdir()
    process, port, _ = _serve(_CHILD, tmp_path, registry, tmp_path / "policies")
    base = f"http://127.0.0.1:{port}/v2/models"
    try:

        def settled() -> bool:
            assert process.poll() is None, process.communicate()[0]
            return _status(f"{base}/remote/versions/1") == 200 and all(
                _status(f"{base}/{m}/versions/1.0.0/ready") not in (0, 200)
                for m in ("fraud-onnx", "fraud")
            )

        asyncio.run(eventually(settled, timeout_s=25))
        assert _sum_via(base) == [3, 7]  # proxied to the upstream and back
    finally:
        output = _stopped(process)
    assert process.returncode == 0, output
    assert "needs onnxruntime, which is not installed (pip install 'rollguard[onnx]')" in output
    assert "framework 'sklearn' needs scikit-learn and skops" in output
    assert "rollguard[sklearn]" in output


SRM_POLICY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: remote}
spec:
  model: remote
  stable: "1"
  candidate: "2"
  key: header:x-user-id
  interval: 0.1s
  steps:
    - {weight: 50, hold: 1h}
    - {weight: 100}
  checks:
    - {metric: srm, on_fail: alert}
"""
DRIFT_POLICY = SRM_POLICY.replace("{name: remote}", "{name: drifting}").replace(
    "{metric: srm, on_fail: alert}", "{metric: drift, on_fail: alert}"
)


def _json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        found: dict[str, Any] = json.loads(answer.read())
        return found


def test_policies_without_scipy(tmp_path: Path, upstream: str) -> None:
    """The core install's statistics: a sample-ratio check (both of its p-values) is
    computed with scipy unimportable; a drift check, which needs scipy's KS test, is
    refused at load with the extra to install, and the other rollout runs on."""
    registry = tmp_path / "registry"
    for version in ("1", "2"):
        write_remote_version(registry, version, upstream)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "remote.yaml").write_text(SRM_POLICY)
    (policies / "drifting.yaml").write_text(DRIFT_POLICY)
    process, port, admin_port = _serve(_CHILD, tmp_path, registry, policies)
    admin = f"http://127.0.0.1:{admin_port}/admin/rollouts/remote"
    try:

        def routing() -> bool:
            assert process.poll() is None, process.communicate()[0]
            return (
                _status(admin) == 200
                and _status(f"http://127.0.0.1:{port}/v2/models/remote/versions/2/ready") == 200
            )

        asyncio.run(eventually(routing, timeout_s=25))
        base = f"http://127.0.0.1:{port}/v2/models"
        for user in range(60):  # 60 users: 30 expected an arm, past the 8 the check needs
            assert _sum_via(base, {"x-user-id": f"user-{user}"}) == [3, 7]

        def srm_detail() -> dict[str, Any]:
            last = _json(admin).get("last_decision") or {"checks": []}
            found = [c["detail"] for c in last["checks"] if c["metric"] == "srm"]
            return found[0] if found else {}

        asyncio.run(eventually(lambda: "pearson_pvalue" in srm_detail(), timeout_s=25))
        detail = srm_detail()
        assert 0.0 < detail["pearson_pvalue"] <= 1.0 and 0.0 < detail["pvalue_now"] <= 1.0
        assert _status(f"http://127.0.0.1:{admin_port}/admin/rollouts/drifting") == 404
    finally:
        output = _stopped(process)
    assert process.returncode == 0, output
    assert "the drift metric needs scipy, which is not installed" in output
    assert "pip install 'rollguard[drift]'" in output


# Libraries a proxy-only gateway has no use for: model runtimes (their extras), scipy (the
# drift extra's KS test, imported when a drift policy arrives), Redis (fleet mode) and
# plotting. Each costs tens of MB of memory once imported.
UNNEEDED = (*RUNTIMES, "scipy", "tritonclient", "redis", "pandas", "matplotlib")
LOCAL_ONLY = ("isolation", "workerprocess", "worker", "batching")  # serving/ modules
_RECORDING_CHILD = """
import atexit
import os
import sys
from pathlib import Path


def record():
    Path(os.environ["MODULES_FILE"]).write_text("\\n".join(sorted(sys.modules)))


atexit.register(record)
from rollguard.proxy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _modules_of_a_gateway(
    tmp_path: Path, upstream: str, options: list[str], use: Callable[[str, str], None]
) -> set[str]:
    """Every module a proxy-only `rollguard serve` (one http version in front of
    `upstream`) had imported when it exited, after `use(data_base, admin_base)` ran."""
    registry = tmp_path / "registry"
    write_remote_version(registry, "1", upstream)
    (tmp_path / "policies").mkdir()
    modules = tmp_path / "modules.txt"
    process, port, admin_port = _serve(
        _RECORDING_CHILD, tmp_path, registry, tmp_path / "policies", *options,
        MODULES_FILE=str(modules),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v2/models"
    try:

        def ready() -> bool:
            assert process.poll() is None, process.communicate()[0]
            return _status(f"{base}/remote/versions/1/ready") == 200

        asyncio.run(eventually(ready, timeout_s=25))
        assert _sum_via(base) == [3, 7]  # the proxy path itself ran
        use(base, f"http://127.0.0.1:{admin_port}")
    finally:
        output = _stopped(process)
    assert process.returncode == 0, output
    recorded = set(modules.read_text().split())
    assert "rollguard" in {name.partition(".")[0] for name in recorded}  # the gateway's
    return recorded


@pytest.mark.parametrize("grpc", [True, False], ids=["grpc-port", "no-grpc"])
def test_a_proxy_only_gateway_imports_no_heavy_library(
    tmp_path: Path, upstream: str, grpc: bool
) -> None:
    def scrape(base: str, admin: str) -> None:
        assert _status(f"{admin}/metrics") == 200

    options = ["--grpc-port", str(_free_port())] if grpc else ["--no-grpc"]
    recorded = _modules_of_a_gateway(tmp_path, upstream, options, scrape)
    imported = {name.partition(".")[0] for name in recorded}
    assert not imported & set(UNNEEDED)
    # The gRPC port is on by default and needs grpc; without it grpc is never imported.
    assert ("grpc" in imported) is grpc
    # Worker processes (multiprocessing) and micro-batching are imported with the first
    # version that asks for them (serving/registry.py `_compose`); a proxy has none.
    loaded_only_for_local = {"multiprocessing", *(f"rollguard.serving.{m}" for m in LOCAL_ONLY)}
    assert not recorded & loaded_only_for_local


def test_a_gateway_that_sends_no_webhook_never_imports_aiohttp(
    tmp_path: Path, upstream: str
) -> None:
    """aiohttp is the webhooks' HTTP client (with its TLS context, about 15 MiB): both
    ports, the admin API and the dashboard included, are served without it."""

    def every_admin_page(base: str, admin: str) -> None:
        for path in ("/metrics", "/admin/rollouts", "/admin/audit", "/ui", "/ui/app.js"):
            assert _status(admin + path) == 200, path
        assert _status(f"{admin}/admin/rollouts/nothing") == 404

    recorded = _modules_of_a_gateway(tmp_path, upstream, ["--no-grpc"], every_admin_page)
    imported = {name.partition(".")[0] for name in recorded}
    assert not imported & {"aiohttp", "yarl", "multidict"}
