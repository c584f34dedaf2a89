"""`rollguard registry add --framework http --endpoint URL`: no artifact, the tensors read
from the upstream's V2 model metadata when it declares them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from rollguard.proxy.cli import main
from rollguard.serving.manifest import load_manifest
from tests.proxy.support import start_upstream

TRITON_LIKE = {
    "name": "bc",
    "versions": ["1"],
    "platform": "onnxruntime_onnx",
    "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 30]}],
    "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}],
}
MLSERVER_LIKE = {"name": "bc", "versions": [], "platform": "", "inputs": [], "outputs": []}


async def _add(tmp_path: Path, metadata: Any, *flags: str) -> tuple[int, Path]:
    async def answer(request: web.Request) -> web.Response:
        if metadata is None:
            return web.json_response({"error": "no such model"}, status=404)
        return web.json_response(metadata)

    app = web.Application()
    app.router.add_get("/v2/models/bc/versions/1", answer)
    runner, base = await start_upstream(app)
    root = tmp_path / "registry"
    try:
        endpoint = f"{base}/v2/models/bc/versions/1"
        argv = ["registry", "--registry", str(root), "add", "--model", "bc", "--version", "1",
                "--framework", "http", "--endpoint", endpoint, *flags]  # fmt: skip
        code = await asyncio.to_thread(main, argv)  # the CLI blocks; the upstream answers
    finally:
        await runner.cleanup()
    return code, root / "bc" / "1" / "model.yaml"


async def test_tensors_come_from_the_upstreams_metadata(tmp_path: Path) -> None:
    code, path = await _add(tmp_path, TRITON_LIKE)
    assert code == 0
    manifest = load_manifest(path)
    assert manifest.framework == "http" and manifest.artifact is None
    assert [t.spec().to_json() for t in manifest.inputs] == TRITON_LIKE["inputs"]
    assert [t.spec().to_json() for t in manifest.outputs] == TRITON_LIKE["outputs"]


async def test_flags_win_and_an_upstream_declaring_none_leaves_them_empty(
    tmp_path: Path,
) -> None:
    code, path = await _add(tmp_path, MLSERVER_LIKE, "--output", "predict:INT64:-1,1")
    assert code == 0
    doc = yaml.safe_load(path.read_text())
    assert doc["inputs"] == []
    assert doc["outputs"] == [{"name": "predict", "datatype": "INT64", "shape": [-1, 1]}]


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [(None, "answered 404"), ({"inputs": [{"name": "x", "datatype": "FP99", "shape": [1]}]},
                               "unknown datatype")],
)  # fmt: skip
async def test_metadata_that_cannot_be_read_is_a_one_line_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], metadata: Any, fragment: str
) -> None:
    code, path = await _add(tmp_path, metadata)
    assert code != 0 and not path.exists()
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
