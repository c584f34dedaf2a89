"""The peer benchmark's MLP targets: one model served with and without micro-batching."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from load_tests.bench import mlp
from load_tests.bench.procs import Processes
from load_tests.bench.targets import MLP_CONNECTIONS, Lab, Target
from load_tests.bench.tools import Tool

pytestmark = pytest.mark.slow


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Processes(tmp_path / "logs") as procs:
        # A small MLP: the targets' wiring is under test here, not the model's cost.
        yield Lab(procs, tmp_path, tmp_path, Tool("nginx", None, "not used"), False, (2, 256))


async def _infer(session: aiohttp.ClientSession, url: str, body: bytes) -> dict[str, np.ndarray]:
    headers = {"Content-Type": "application/json"}
    async with session.post(url, data=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        doc: dict[str, Any] = orjson.loads(await response.read())
    assert doc["model_name"] == mlp.MODEL
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}


async def test_batched_and_unbatched_answer_every_caller_its_own_row(lab: Lab) -> None:
    started: list[Target] = await asyncio.to_thread(
        lab.start, ["rollguard-mlp", "rollguard-mlp-batched"], print
    )
    assert not lab.skipped
    plain, batched = started
    for target in started:
        assert target.connections == MLP_CONNECTIONS
        assert target.body == mlp.request_body()
    bodies = [mlp.request_body(i) for i in range(32)]
    async with aiohttp.ClientSession() as session:
        expected = [await _infer(session, plain.url, b) for b in bodies]
        # All at once: the batcher may merge them, and must hand each caller its own row.
        got = await asyncio.gather(*(_infer(session, batched.url, b) for b in bodies))
    for want, have in zip(expected, got, strict=True):
        assert have["probabilities"].shape == (1, mlp.CLASSES)
        np.testing.assert_array_equal(have["label"], want["label"])
        np.testing.assert_allclose(have["probabilities"], want["probabilities"], atol=1e-5)
    labels = {int(e["label"][0]) for e in expected}
    assert len(labels) > 1  # distinct rows, not one answer repeated
