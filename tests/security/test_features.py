"""Feature-level input schemas on /predict, and the data port's security headers.

A manifest may declare, per input column, a type, a range, an enum or a pattern
(serving/features.py). A `/predict` row that breaks one is a 400 naming the row and the
feature, and never reaches the model (nor counts against any version). Every answer of
the data port, errors included, carries the standard headers that keep browsers from
sniffing, framing or caching it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.proxy.rawhttp import exchange
from tests.proxy.support import serve, start_upstream

MANIFEST = """\
name: payments
version: '1'
framework: http
endpoint: {endpoint}
stage: production
inputs:
  - name: x
    datatype: FP32
    shape: [-1, 3]
    features:
      - {{name: amount, type: number, min: 0, max: 100000}}
      - {{name: hour, type: integer, min: 0, max: 23}}
      - {{name: channel, type: integer, enum: [0, 1, 2]}}
  - name: country
    datatype: BYTES
    shape: [-1]
    features: [{{name: country, type: string, pattern: "[A-Z]{{2}}"}}]
outputs: [{{name: label, datatype: INT64, shape: [-1]}}]
"""

GOOD = {"amount": 12.5, "hour": 3, "channel": 1, "country": "DE"}


async def _upstream() -> tuple[web.AppRunner, str, list[Any]]:
    """A V2 upstream answering label 1 per row, keeping the bodies it was sent."""
    seen: list[Any] = []

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def infer(request: web.Request) -> web.Response:
        doc = await request.json()
        seen.append(doc)
        rows = doc["inputs"][0]["shape"][0]
        out = {"name": "label", "datatype": "INT64", "shape": [rows], "data": [1] * rows}
        return web.json_response({"model_name": "payments", "outputs": [out]})

    app = web.Application()
    app.router.add_get("/v2/models/payments/ready", ready)
    app.router.add_post("/v2/models/payments/infer", infer)
    runner, base = await start_upstream(app)
    return runner, f"{base}/v2/models/payments", seen


BAD = [
    ({"amount": -1.0}, "row 0: feature 'amount': -1.0 is below the minimum 0"),
    ({"amount": 1e9}, "feature 'amount': 1000000000.0 is above the maximum 100000"),
    ({"hour": 24}, "feature 'hour': 24 is above the maximum 23"),
    ({"hour": 2.5}, "feature 'hour': 2.5 is not an integer"),
    ({"channel": 7}, "feature 'channel': 7 is not one of [0, 1, 2]"),
    ({"country": "germany"}, "feature 'country': 'germany' does not match the pattern"),
    ({"country": 49}, "feature 'country': 49 is not a string"),
    ({"amount": "12"}, "feature 'amount': '12' is not a number"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
async def test_a_value_outside_its_feature_schema_is_a_400_naming_the_feature(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    upstream, endpoint, seen = await _upstream()
    directory = tmp_path / "registry" / "payments" / "1"
    directory.mkdir(parents=True)
    (directory / "model.yaml").write_text(MANIFEST.format(endpoint=endpoint))
    try:
        async with (
            serve(tmp_path, tmp_path / "registry") as server,
            aiohttp.ClientSession() as http,
        ):
            url = f"{server.url}/predict/payments"
            async with http.post(url, json={"features": GOOD}) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["predictions"] == {"label": 1}
            body = {"instances": [GOOD | change, GOOD]}
            async with http.post(url, json=body) as resp:
                assert resp.status == 400
                assert message in (await resp.json())["error"]
            assert len(seen) == 1  # the bad request never reached the model
            window = server.gateway.windows.get("payments", "1")
            assert (window.requests, window.errors) == (1, 0)  # nor counted against it
    finally:
        await upstream.cleanup()


SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
}


async def test_every_data_port_answer_carries_the_security_headers(tmp_path: Path) -> None:
    (tmp_path / "registry").mkdir()
    async with serve(tmp_path, tmp_path / "registry") as server, aiohttp.ClientSession() as http:
        answers = []
        for method, path, body in (
            ("GET", "/v2/health/live", None),  # 200
            ("GET", "/v2/models/nope", None),  # 404
            ("POST", "/predict/nope", b"{"),  # 400 or 404
            ("PUT", "/v2", b""),  # 405
        ):
            async with http.request(method, server.url + path, data=body) as resp:
                answers.append((path, resp.status, resp.headers))
        assert {status for _, status, _ in answers} >= {200, 404, 405}
        for path, _, headers in answers:
            for name, value in SECURITY_HEADERS.items():
                assert headers.get(name) == value, (path, name)
            assert headers["Server"] == "rollguard"
        # An answer to bytes that are not HTTP at all carries them too.
        answer = await exchange(server.url, b"NOT HTTP\r\n\r\n")
        assert answer.status == 400
        for name, value in SECURITY_HEADERS.items():
            assert answer.headers.get(name) == value, name
