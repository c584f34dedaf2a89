"""Wrong answers are failures: outputs are checked against the manifest, over loopback.

Real models built to answer wrongly (twice the rows asked for, a third probability
column, NaN where an INT64 label is declared, NaN in a float output, which JSON cannot
carry) and a stand-in upstream answering a shape
its manifest does not declare: every such answer is a 500 (502 from an upstream) naming
model, version and what was wrong, counted against that version, never a 200. A
candidate that answers outside its manifest is rolled back and its errors never land
in the stable's window.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from tests.faults import models
from tests.faults.support import Tally, admin, post, requests_by_code, until, v2_body
from tests.proxy.support import serve, start_upstream, write_remote_version

LABEL_ONLY = [{"name": "label", "datatype": "INT64", "shape": [-1]}]
PREDICTION = [{"name": "prediction", "datatype": "FP64", "shape": [-1]}]
# JSON has no NaN: a float output holding one is the model's failure, declared or not.
FLOAT_NAN = "output 'prediction': 2 of 2 values are NaN or infinite, which a V2 answer cannot carry"


def _nan_rows() -> tuple[np.ndarray, np.ndarray]:
    """Rows the rounded-root model answers NaN for, and rows it answers a class for."""
    x = models.rows()
    predicted = models.rounded_root().predict(x)
    nan = np.isnan(predicted)
    assert nan.sum() >= 2 and (~nan).sum() >= 2
    return x[nan][:2], x[~nan][:2]


def _write_wrong(registry: Path, fault: str) -> None:
    if fault.endswith("nan"):
        data = models.joblib_bytes(models.rounded_root())
        outputs = {"nan": LABEL_ONLY, "float-nan": PREDICTION, "undeclared-nan": []}[fault]
        models.write_version(registry, "m", "1", "model.joblib", data, outputs=outputs)
        return
    edit: Callable[[Any], Any] = {"rows": models.wrong_rows, "width": models.wrong_width}[fault]
    data = models.onnx_bytes(edit(models.onnx_model(models.logistic())))
    models.write_version(registry, "m", "1", "model.onnx", data)


WRONG = {
    "rows": "output 'label': 4 rows for a request of 2",
    "width": "output 'probabilities': shape [2, 3] does not match declared [-1, 2]",
    "nan": "output 'label': 2 of 2 values are NaN or infinite, which its declared datatype "
    "INT64 cannot carry",
    "float-nan": FLOAT_NAN,
    "undeclared-nan": FLOAT_NAN,
}


@pytest.mark.parametrize("fault", list(WRONG))
async def test_an_answer_outside_the_manifest_is_a_500_counted_against_its_version(
    tmp_path: Path, fault: str
) -> None:
    registry = tmp_path / "registry"
    _write_wrong(registry, fault)
    good = models.onnx_bytes(models.onnx_model(models.logistic()))
    models.write_version(registry, "good", "1", "model.onnx", good)
    x = _nan_rows()[0] if fault.endswith("nan") else models.rows()[:2]
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        urls = {
            "routed": f"{server.url}/v2/models/m/infer",
            "pinned": f"{server.url}/v2/models/m/versions/1/infer",
        }
        for how, url in urls.items():
            async with http.post(url, json=v2_body(x)) as r:
                assert r.status == 500, (how, await r.text())
                assert r.headers["x-rollguard-variant"] == "1"
                error = (await r.json())["error"]
            assert error.startswith("m 1 answered outside its manifest: "), error
            assert WRONG[fault] in error
        async with http.post(f"{server.url}/predict/m", json={"instances": x.tolist()}) as r:
            assert r.status == 500 and WRONG[fault] in (await r.json())["error"]
        # Routed calls count as the version's failures (the pinned one never counts).
        assert await requests_by_code(server, http, "m", "1") == {"200": 0.0, "500": 2.0}
        # A well-formed model beside it answers as ever.
        async with http.post(f"{server.url}/v2/models/good/infer", json=v2_body(x)) as r:
            assert r.status == 200
        if fault == "nan":  # the same model answers the rows it has a class for
            ok = _nan_rows()[1]
            async with http.post(urls["routed"], json=v2_body(ok)) as r:
                assert r.status == 200, await r.text()
                (label,) = (o for o in (await r.json())["outputs"] if o["name"] == "label")
            assert label["datatype"] == "INT64" and set(label["data"]) <= {0, 1}


POLICY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: m}
spec:
  model: m
  stable: "1"
  candidate: "2"
  key: header:x-user-id
  interval: 0.1s
  steps:
    - {weight: 30, hold: 1h}
    - {weight: 100}
  checks:
    - {metric: error_rate, max_increase_vs_stable: 0.005, min_samples: 20, on_fail: rollback}
"""


@pytest.mark.slow
async def test_a_candidate_answering_outside_its_manifest_is_rolled_back(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    proto = models.onnx_model(models.logistic())
    models.write_version(registry, "m", "1", "model.onnx", models.onnx_bytes(proto))
    wrong = models.onnx_bytes(models.wrong_width(models.onnx_model(models.logistic())))
    models.write_version(registry, "m", "2", "model.onnx", wrong, stage="staging")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "m.yaml").write_text(POLICY)
    x = models.rows()
    tally = Tally()
    async with (
        serve(tmp_path, registry, policies=policies) as server,
        aiohttp.ClientSession() as http,
    ):
        url = f"{server.url}/v2/models/m/infer"

        async def rolled_back() -> bool:
            for i in range(20):
                headers = {"x-user-id": f"user-{tally.total}-{i}"}
                await post(http, url, v2_body(x[tally.total % len(x)][None]), tally, headers)
            doc = await admin(server, http, "rollouts/m")
            return bool(doc["phase"] == "rolled_back")

        await until(rolled_back, timeout_s=25)
        doc = await admin(server, http, "rollouts/m")
        stable_codes = await requests_by_code(server, http, "m", "1")
        candidate_codes = await requests_by_code(server, http, "m", "2")
    # Every wrong answer was the candidate's 500, none was a 200; the stable answered
    # everything else, and its window holds no error.
    assert tally.of("2", 200) == 0 and tally.of("2", 500) > 0, tally.by_variant
    assert tally.of("1") == tally.of("1", 200), tally.errors
    assert set(tally.statuses) == {200, 500}
    assert doc["variants"]["stable"]["errors"] == 0
    assert stable_codes == {"200": float(tally.of("1", 200))}
    assert candidate_codes.get("500") == float(tally.of("2", 500))
    assert candidate_codes.get("200", 0.0) == 0.0


async def test_an_upstream_answering_outside_the_manifest_is_a_502(tmp_path: Path) -> None:
    """Checked from the upstream's JSON (names, datatypes, shapes), no numpy needed."""
    answers = {
        "right": [{"name": "y", "datatype": "FP32", "shape": [2, 1], "data": [0.5, 0.25]}],
        "rows": [{"name": "y", "datatype": "FP32", "shape": [3, 1], "data": [0.5, 0.25, 1.0]}],
        "dtype": [{"name": "y", "datatype": "FP64", "shape": [2, 1], "data": [0.5, 0.25]}],
        "missing": [{"name": "z", "datatype": "FP32", "shape": [2, 1], "data": [0.5, 0.25]}],
        "null": [{"name": "y", "datatype": "FP32", "shape": [2, 1], "data": [0.5, None]}],
    }

    async def infer(request: web.Request) -> web.Response:
        outputs = answers[request.match_info["how"]]
        return web.json_response({"model_name": "remote", "outputs": outputs})

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    app = web.Application()
    app.router.add_post("/v2/models/{how}/infer", infer)
    app.router.add_get("/v2/models/{how}/ready", ready)
    upstream, base = await start_upstream(app)
    registry = tmp_path / "registry"
    declared = "[{name: y, datatype: FP32, shape: [-1, 1]}]"
    for how in answers:
        write_remote_version(registry, how, f"{base}/v2/models/{how}", outputs=declared)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}]}
    wrong = {
        "rows": "output 'y': 3 rows for a request of 2",
        "dtype": "output 'y': datatype FP64, declared FP32",
        "missing": "output 'y' is missing (it gives ['z'])",
        "null": "output 'y': null in its data, where numbers belong",
    }
    try:
        async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
            for how in answers:
                url = f"{server.url}/v2/models/remote/versions/{how}/infer"
                # An upstream answers the outputs asked for: one left out is missing when
                # the request names it.
                asked = body | {"outputs": [{"name": "y"}]} if how == "missing" else body
                async with http.post(url, json=asked) as r:
                    doc = await r.json()
                    if how == "right":
                        assert r.status == 200, doc
                        continue
                    assert r.status == 502, (how, doc)
                    assert (
                        doc["error"] == f"remote {how} answered outside its manifest: {wrong[how]}"
                    )
    finally:
        await upstream.cleanup()
