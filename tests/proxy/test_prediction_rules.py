"""The prediction a manifest declares, read off a real MLServer-shaped upstream's answers
([N, 1] `predict`, class names as BYTES) and scored against numeric or string labels."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from tests.proxy.mlserver_standin import MLServerStandIn, write_version
from tests.proxy.support import serve, start_upstream

_DATA = load_breast_cancer()
X = _DATA.data
NAMES = _DATA.target_names[_DATA.target]  # "malignant" / "benign"

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


@pytest.fixture
async def standin(request: pytest.FixtureRequest) -> AsyncIterator[tuple[MLServerStandIn, str]]:
    """Two MLServer-shaped versions: a good one and a weaker one, on names or integers."""
    target = NAMES if request.param == "names" else _DATA.target
    models: dict[str, Any] = {
        "1": make_pipeline(StandardScaler(), LogisticRegression()).fit(X, target),
        "2": DecisionTreeClassifier(max_depth=1, random_state=0).fit(X, target),
    }
    server = MLServerStandIn("bc", models)
    runner, base = await start_upstream(server.application())
    try:
        yield server, base
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("standin", ["names", "ints"], indirect=True)
async def test_accuracy_of_each_variant_is_its_models_own(
    tmp_path: Path, standin: tuple[MLServerStandIn, str]
) -> None:
    """Every request labelled with its true class: each variant's accuracy is exactly
    its model's on the rows it answered (not 0.37 from reading [N, 1] as an argmax)."""
    upstream, base = standin
    names = upstream.models["1"].predict(X[:1]).dtype.kind in "OUS"
    registry = tmp_path / "registry"
    datatype = "BYTES" if names else "INT64"
    write_version(registry, "1", upstream.url(base, "1"), datatype=datatype,
                  stage="production", rule="{output: predict, read: label}")  # fmt: skip
    write_version(registry, "2", upstream.url(base, "2"), datatype=datatype,
                  stage="staging", rule="{output: predict}")  # fmt: skip
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "bc.yaml").write_text(AB)
    truth = NAMES if names else _DATA.target
    served: dict[str, list[int]] = {"1": [], "2": []}
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        for i in range(0, len(X), 2):
            body = {
                "id": f"r{i}",
                "inputs": [
                    {"name": "input-0", "datatype": "FP64", "shape": [1, 30], "data": X[i].tolist()}
                ],
            }
            async with http.post(f"{server.url}/v2/models/bc/infer", json=body) as resp:
                assert resp.status == 200, await resp.text()
                answer = await resp.json()
                assert answer["outputs"][0]["shape"] == [1, 1]
                served[resp.headers["x-rollguard-variant"]].append(i)
            label = str(truth[i]) if names else int(truth[i])
            async with http.post(
                f"{server.url}/v2/models/bc/feedback", json={"id": f"r{i}", "label": label}
            ) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["accepted"] == [f"r{i}"]
        async with http.get(f"{server.admin_url}/admin/rollouts/bc") as resp:
            variants = (await resp.json())["variants"]
    for role, version in (("stable", "1"), ("candidate", "2")):
        rows = served[version]
        assert len(rows) > 50  # a 50/50 split of 285 requests
        truly = float(np.mean(upstream.models[version].predict(X[rows]) == truth[rows]))
        summary = variants[role]
        assert summary["labelled"] == len(rows)
        assert summary["accuracy"] == pytest.approx(truly)
    assert variants["stable"]["accuracy"] > 0.95  # the good model reads as good


@pytest.mark.parametrize("standin", ["names"], indirect=True)
async def test_labels_are_numbers_or_strings_and_nothing_else(
    tmp_path: Path, standin: tuple[MLServerStandIn, str]
) -> None:
    upstream, base = standin
    registry = tmp_path / "registry"
    write_version(registry, "1", upstream.url(base, "1"), datatype="BYTES",
                  stage="production", rule="{output: predict}")  # fmt: skip
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        feedback = f"{server.url}/v2/models/bc/feedback"
        for bad, fragment in (
            ({"id": "a", "label": True}, "number or a class name"),
            ({"id": "a", "label": {"x": 1}}, "number or a class name"),
            ({"id": "a", "label": ""}, "printable characters"),
            ({"id": "a", "label": "x" * 257}, "printable characters"),
            ({"id": "a", "label": "a\nb"}, "printable characters"),
        ):
            async with http.post(feedback, json=bad) as resp:
                assert resp.status == 400
                assert fragment in (await resp.json())["error"]
        body = {"id": "q", "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 30],
                                      "data": X[0].tolist()}]}  # fmt: skip
        async with http.post(f"{server.url}/v2/models/bc/infer", json=body) as resp:
            assert resp.status == 200
        # A list of one label is that label; the wrong class name is a wrong answer.
        async with http.post(feedback, json={"id": "q", "label": ["benign"]}) as resp:
            assert resp.status == 200
        evidence = server.gateway.windows.get("bc", "1").evidence()
        assert (evidence.labelled, evidence.correct) == (1, 0)  # row 0 is malignant


async def test_a_manifest_naming_an_undeclared_output_is_refused(tmp_path: Path) -> None:
    upstream = MLServerStandIn("bc", {})
    runner, base = await start_upstream(web.Application())
    try:
        registry = tmp_path / "registry"
        write_version(registry, "1", upstream.url(base, "1"), datatype="INT64",
                      stage="production", rule="{output: proba, read: argmax}")  # fmt: skip
        async with serve(tmp_path, registry) as server:
            refused = server.running.registry.refused()
            assert any("prediction" in reason for reason in refused.values()), refused
    finally:
        await runner.cleanup()
