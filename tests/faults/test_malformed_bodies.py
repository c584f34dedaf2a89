"""Malformed inference bodies: every one a 400 with a JSON error, none counted against a
version (issue: 500s for a huge shape, a fake gzip body, null and out-of-range numbers)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import serve

WIDTH = 30  # the demo fraud model's features


def _body(data: list[Any], shape: list[int] | None = None, datatype: str = "FP32") -> bytes:
    item = {"name": "input", "datatype": datatype, "shape": shape or [1, WIDTH], "data": data}
    return orjson.dumps({"inputs": [item]})


CASES: dict[str, tuple[bytes, dict[str, str]]] = {
    "huge shape, no data": (_body([], [2**63, 0]), {}),
    "null in FP32 data": (_body([None] * WIDTH), {}),
    "one null among numbers": (_body([0.5] * (WIDTH - 1) + [None]), {}),
    "1e308 in FP32 data": (_body([1e308] * WIDTH), {}),
    "-1e39 in FP32 data": (_body([0.0] * (WIDTH - 1) + [-1e39]), {}),
    "70000 in FP16 data": (_body([70000] * WIDTH, datatype="FP16"), {}),
    "gzip header on a plain body": (_body([0.5] * WIDTH), {"Content-Encoding": "gzip"}),
    "truncated gzip": (gzip.compress(_body([0.5] * WIDTH))[:-12], {"Content-Encoding": "gzip"}),
    "nested data": (_body([[0.5] * WIDTH, "x"]), {}),
    "not JSON": (b"{inputs: ", {}),
    "shape and data disagree": (_body([0.5] * (WIDTH + 1)), {}),
}


async def _error_codes(http: aiohttp.ClientSession, admin_url: str) -> dict[str, float]:
    async with http.get(f"{admin_url}/metrics") as response:
        text = await response.text()
    codes: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("rollguard_requests_total{") and 'model="fraud"' in line:
            labels, value = line.rsplit(" ", 1)
            code = labels.split('code="', 1)[1].split('"', 1)[0]
            codes[code] = codes.get(code, 0.0) + float(value)
    return codes


@pytest.mark.parametrize("case", sorted(CASES))
async def test_malformed_body_is_a_400_and_not_counted(
    case: str, tmp_path: Path, make_registry: MakeRegistry
) -> None:
    body, headers = CASES[case]
    registry = make_registry("fraud/1.0.0")
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        url = f"{server.url}/v2/models/fraud/infer"
        async with http.post(url, data=body, headers=headers) as response:
            assert response.status == 400, await response.text()
            error = (await response.json())["error"]
        assert isinstance(error, str) and error
        # A good request still works, and only it is counted.
        async with http.post(url, data=_body([0.5] * WIDTH)) as response:
            assert response.status == 200, await response.text()
        codes = await _error_codes(http, server.admin_url)
        assert codes == {"200": 1.0}, codes


PREDICT_CASES: dict[str, Any] = {
    "null feature values": {"features": {"input": [None] * WIDTH}},
    "1e308 feature values": {"features": {"input": [1e308] * WIDTH}},
    "a string among numbers": {"instances": [{"input": [0.5] * (WIDTH - 1) + ["x"]}]},
    "rows not objects": {"instances": [3]},
}


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
async def test_malformed_predict_body_is_a_400_and_not_counted(
    case: str, tmp_path: Path, make_registry: MakeRegistry
) -> None:
    registry = make_registry("fraud/1.0.0")
    async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
        url = f"{server.url}/predict/fraud"
        async with http.post(url, data=orjson.dumps(PREDICT_CASES[case])) as response:
            assert response.status == 400, await response.text()
            assert (await response.json())["error"]
        good = {"features": {"input": [0.5] * WIDTH}}
        async with http.post(url, data=orjson.dumps(good)) as response:
            assert response.status == 200, await response.text()
        assert await _error_codes(http, server.admin_url) == {"200": 1.0}
