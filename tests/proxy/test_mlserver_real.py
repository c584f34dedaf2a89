"""rollguard in front of a real MLServer 1.7.1 (scikit-learn runtime), driven with
tritonclient.http: binary tensors and requested outputs, per-variant accuracy, a failing
upstream version rolled back, an upstream 400 answered 400 and not counted.

MLServer lives in its own virtualenv: `ROLLGUARD_MLSERVER_PYTHON` names its python, or
the test makes one under ~/.cache/rollguard (pip install mlserver mlserver-sklearn;
minutes, once). The test is skipped, saying why, when that cannot be done.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http.aio as triton_aio
import yaml
from sklearn.datasets import load_breast_cancer
from tritonclient.http import InferInput, InferRequestedOutput

from rollguard.proxy.cli import main
from tests.proxy.support import Server, serve

pytestmark = pytest.mark.timeout(1200)  # the first run installs MLServer

MLSERVER = "mlserver==1.7.1"
MLSERVER_SKLEARN = "mlserver-sklearn==1.7.1"
X, Y = load_breast_cancer(return_X_y=True)

TRAIN = """
import sys, joblib
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
x, y = load_breast_cancer(return_X_y=True)
root = sys.argv[1]
joblib.dump(make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y), f"{root}/v1.joblib")
joblib.dump(DecisionTreeClassifier(max_depth=1, random_state=0).fit(x, y), f"{root}/v2.joblib")
joblib.dump(make_pipeline(StandardScaler(), LogisticRegression()).fit(x[:, :29], y),
            f"{root}/v3.joblib")  # takes 29 features: every 30-feature call fails (500)
"""


def _mlserver_python() -> Path:
    given = os.environ.get("ROLLGUARD_MLSERVER_PYTHON")
    if given:
        return Path(given)
    venv = Path.home() / ".cache" / "rollguard" / "mlserver-1.7.1"
    python = venv / "bin" / "python"
    if (venv / "bin" / "mlserver").exists():
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", MLSERVER, MLSERVER_SKLEARN],
            check=True,
            timeout=900,
            capture_output=True,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"cannot install {MLSERVER} and {MLSERVER_SKLEARN} in a venv: {exc}")
    return python


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLServer serving bc v1 (accurate), v2 (a stump), v3 (fails every call)."""
    python = _mlserver_python()
    root = tmp_path_factory.mktemp("mlserver")
    subprocess.run([str(python), "-c", TRAIN, str(root)], check=True, timeout=300)
    for version in ("v1", "v2", "v3"):
        folder = root / f"bc-{version}"
        folder.mkdir()
        (root / f"{version}.joblib").rename(folder / "model.joblib")
        settings = {
            "name": "bc",
            "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": "./model.joblib", "version": version},
        }
        (folder / "model-settings.json").write_text(json.dumps(settings))
    port = _free_port()
    (root / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": port,
                "grpc_port": _free_port(),
                "metrics_port": _free_port(),
                "parallel_workers": 0,
                "metrics_endpoint": None,
            }
        )
    )
    log = (root / "mlserver.log").open("wb")
    process = subprocess.Popen(
        [str(python.parent / "mlserver"), "start", str(root)],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                import urllib.request

                with urllib.request.urlopen(f"{base}/v2/models/bc/versions/v3/ready", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError(
                        "MLServer did not start: " + (root / "mlserver.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.2)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


async def _add(root: Path, model: str, version: str, endpoint: str, stage: str) -> None:
    """`rollguard registry add` of an http version, then the two blocks MLServer needs."""
    argv = ["registry", "--registry", str(root), "add", "--model", model, "--version", version,
            "--framework", "http", "--endpoint", endpoint, "--stage", stage,
            "--input", "input-0:FP64:-1,30"]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 0  # reads MLServer's (empty) metadata
    path = root / model / version / "model.yaml"
    doc = yaml.safe_load(path.read_text())
    assert doc["outputs"] == []  # MLServer declares none
    doc["prediction"] = {"output": "predict", "read": "label"}  # [N, 1]
    doc["upstream"] = {"binary_tensors": False, "probe_interval_s": 0.5}
    path.write_text(yaml.safe_dump(doc))


AB = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: bc}
spec:
  model: bc
  stable: "1"
  candidate: "2"
  strategy: ab
  split: random
  ab_weight: 50
  sample_size: 100000
  duration: 1h
  interval: 1s
  checks:
    - {metric: error_rate, max: 0.5, min_samples: 100000, on_fail: alert}
"""
CANARY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: bcc}
spec:
  model: bcc
  stable: "1"
  candidate: "3"
  strategy: canary
  split: random
  steps:
    - {weight: 50, hold: 1h, min_requests: 10}
    - {weight: 100}
  interval: 0.2s
  on_candidate_unavailable: rollback   # ejected for failing calls: rolled back too
  checks:
    - {metric: error_rate, max_increase_vs_stable: 0.05, min_samples: 20, on_fail: rollback}
"""


@pytest.fixture
async def gateway(tmp_path: Path, mlserver: str) -> AsyncIterator[Server]:
    root = tmp_path / "registry"
    await _add(root, "bc", "1", f"{mlserver}/v2/models/bc/versions/v1", "production")
    await _add(root, "bc", "2", f"{mlserver}/v2/models/bc/versions/v2", "staging")
    await _add(root, "bcc", "1", f"{mlserver}/v2/models/bc/versions/v1", "production")
    await _add(root, "bcc", "3", f"{mlserver}/v2/models/bc/versions/v3", "staging")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "bc.yaml").write_text(AB)
    (policies / "bcc.yaml").write_text(CANARY)
    async with serve(tmp_path, root) as server:
        yield server


def _rows(i: int) -> tuple[list[InferInput], list[InferRequestedOutput]]:
    tensor = InferInput("input-0", [1, 30], "FP64")
    tensor.set_data_from_numpy(X[i : i + 1], binary_data=True)
    outputs = [
        InferRequestedOutput("predict", binary_data=True),
        InferRequestedOutput("predict_proba", binary_data=True),
    ]
    return [tensor], outputs


async def test_accuracy_and_requested_outputs_through_rollguard(gateway: Server) -> None:
    server = gateway
    client = triton_aio.InferenceServerClient(server.url.removeprefix("http://"))
    served: dict[str, list[int]] = {"1": [], "2": []}
    predicted: dict[int, int] = {}
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(0, len(X), 2):
                inputs, outputs = _rows(i)
                result = await client.infer("bc", inputs, outputs=outputs, request_id=f"r{i}")
                response: dict[str, Any] = result.get_response()
                assert response["id"] == f"r{i}"
                proba, label = result.as_numpy("predict_proba"), result.as_numpy("predict")
                assert proba is not None and label is not None
                assert proba.shape == (1, 2) and label.shape == (1, 1)
                served[response["model_version"]].append(i)
                predicted[i] = int(label[0, 0])
                feedback = {"id": f"r{i}", "label": int(Y[i])}
                async with http.post(f"{server.url}/v2/models/bc/feedback", json=feedback) as r:
                    assert r.status == 200
            # An upstream 400 (an output MLServer does not have) comes back as it was.
            body = {
                "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 30],
                            "data": X[0].tolist()}],
                "outputs": [{"name": "nope"}],
            }  # fmt: skip
            before = {v: server.gateway.windows.get("bc", v).requests for v in ("1", "2")}
            async with http.post(f"{server.url}/v2/models/bc/versions/1/infer", json=body) as r:
                assert r.status == 400
                assert "nope" in (await r.json())["error"]
            after = {v: server.gateway.windows.get("bc", v).requests for v in ("1", "2")}
            assert after == before
            assert server.gateway.windows.get("bc", "1").errors == 0
    finally:
        await client.close()
    variants = server.rollouts.describe("bc")["variants"]
    for role, version in (("stable", "1"), ("candidate", "2")):
        rows = served[version]
        assert len(rows) > 50
        true_accuracy = float(np.mean([predicted[i] == Y[i] for i in rows]))
        assert abs(variants[role]["accuracy"] - true_accuracy) <= 0.02
    assert variants["stable"]["accuracy"] > 0.95  # not the 0.38 of reading [N, 1] as argmax


async def test_a_failing_upstream_version_is_rolled_back(gateway: Server) -> None:
    server = gateway
    client = triton_aio.InferenceServerClient(server.url.removeprefix("http://"))
    statuses: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 25
        i = 0
        while server.rollouts.describe("bcc")["phase"] != "rolled_back":
            assert time.monotonic() < deadline, server.rollouts.describe("bcc")
            inputs, outputs = _rows(i % len(X))
            try:
                await client.infer("bcc", inputs, outputs=outputs)
                statuses["200"] = statuses.get("200", 0) + 1
            except Exception as exc:  # the candidate's 502s
                code = str(getattr(exc, "status", lambda: "?")())
                statuses[code] = statuses.get(code, 0) + 1
            i += 1
    finally:
        await client.close()
    assert statuses.get("502", 0) > 0 and statuses.get("200", 0) > 0
    assert server.gateway.windows.get("bcc", "3").errors > 0
    assert server.gateway.windows.get("bcc", "1").errors == 0
