"""Smoke test of the side-by-side benchmark: bare and rollguard answer V2 alike under load."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from load_tests.bench import client, models
from load_tests.bench.__main__ import rollguard_notes
from load_tests.bench.procs import Processes
from load_tests.bench.targets import Lab, Target
from load_tests.bench.tools import Tool

pytestmark = pytest.mark.slow


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    demo = models.build_demo(tmp_path, ("onnx",))
    with Processes(tmp_path / "logs") as procs:
        yield Lab(procs, tmp_path, demo, Tool("nginx", None, "not used"), install=False)


async def _answer(url: str, user: str) -> tuple[dict[str, Any], str | None]:
    headers = {"Content-Type": "application/json", models.KEY_HEADER: user}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=models.request_body(), headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        return orjson.loads(await response.read()), response.headers.get("x-rollguard-variant")


def _outputs(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    """The V2 outputs as arrays shaped as declared; checks the V2 fields on the way."""
    assert doc["model_name"] == models.MODEL
    assert "model_version" in doc
    arrays = {}
    for out in doc["outputs"]:
        assert set(out) >= {"name", "datatype", "shape", "data"}
        arrays[out["name"]] = np.asarray(out["data"]).reshape(out["shape"])
    assert arrays["label"].shape == (1,)
    assert arrays["probabilities"].shape == (1, 2)
    return arrays


async def test_bare_and_rollguard_answer_alike_under_load(lab: Lab) -> None:
    started: list[Target] = await asyncio.to_thread(lab.start, ["bare", "rollguard"], print)
    assert not lab.skipped
    bare, rollguard = started

    bare_doc, _ = await _answer(bare.url, "user-1")
    # The canary splits users by hash: find one the stable version (bare's model) answers.
    for i in range(200):
        doc, variant = await _answer(rollguard.url, f"user-{i}")
        if variant == models.STABLE:
            break
    else:
        pytest.fail("no user landed on the stable version in 200 tries")
    assert doc["model_version"] == models.STABLE
    expected, got = _outputs(bare_doc), _outputs(doc)
    np.testing.assert_array_equal(got["label"], expected["label"])
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], rtol=1e-6)

    for target in started:
        result = await client.closed_loop(
            target.url,
            models.request_body(),
            connections=4,
            duration_s=1.0,
            headers=client.user_headers(models.KEY_HEADER),
        )
        assert result.errors == 0, target.name
        assert result.requests > 0, target.name
        assert result.p50_ms <= result.p99_ms

    # Admin and /metrics are on rollguard's admin port only; the notes read them there.
    assert rollguard.admin and rollguard.admin != rollguard.base
    assert not bare.admin
    notes = rollguard_notes(rollguard)
    assert notes["rollout"] == {"phase": "progressing", "weight": models.CANARY_WEIGHT}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{rollguard.base}/admin/rollouts") as response,
    ):
        assert response.status == 404
