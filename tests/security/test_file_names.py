"""Registry directories whose names are not UTF-8 text are passed over, and break nothing.

Found by an adversarial probe (with policy files; tests/security/test_policy_files.py):
such a name went into metric labels as surrogates, and /metrics answered 500 from then on.
The real gateway over loopback, real directories.
"""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest

from tests.faults.support import until
from tests.proxy.support import serve


async def test_model_and_version_directories_named_in_bytes_are_passed_over(
    tmp_path: Path, demo_registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = tmp_path / "registry"
    (registry / "fraud-onnx").mkdir(parents=True)
    (registry / "fraud-onnx" / "1.0.0").symlink_to(demo_registry / "fraud-onnx" / "1.0.0")
    odd_model = registry / os.fsdecode(b"fr\xffaud")
    odd_model.mkdir()
    (odd_model / "1.0.0").symlink_to(demo_registry / "fraud-onnx" / "1.0.0")
    odd_version = registry / "fraud-onnx" / os.fsdecode(b"1.1.\xff")
    odd_version.symlink_to(demo_registry / "fraud-onnx" / "1.1.0")
    async with (
        serve(tmp_path, registry, registry_poll_s=0.1) as server,
        aiohttp.ClientSession() as http,
    ):

        async def served() -> bool:
            async with http.get(f"{server.url}/v2/models/fraud-onnx") as r:
                return r.status == 200 and (await r.json())["versions"] == ["1.0.0"]

        await until(served)
        async with http.get(f"{server.admin_url}/metrics") as r:
            assert r.status == 200
        async with http.get(f"{server.url}/v2/health/ready") as r:
            assert r.status == 200
    said = [r.getMessage() for r in caplog.records if "is not UTF-8 text" in r.getMessage()]
    assert any("fr\ufffdaud" in m for m in said) and any("1.1.\ufffd" in m for m in said), said
