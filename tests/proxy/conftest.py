"""Fixtures for gateway tests: a real demo registry, built once per session."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from rollguard.serving.demo.build import build_demo_registry


@pytest.fixture(scope="session")
def demo_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built in a child process: training leaves library state (torch, sklearn) behind
    that the gateway tests should not inherit."""
    root = tmp_path_factory.mktemp("demo") / "registry"
    code = f"from pathlib import Path; from {build_demo_registry.__module__} import "
    code += f"build_demo_registry; build_demo_registry(Path({str(root)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True)
    return root


MakeRegistry = Callable[..., Path]


@pytest.fixture
def make_registry(tmp_path: Path, demo_registry: Path) -> MakeRegistry:
    """A registry of chosen demo versions ("fraud/1.0.0", ...), linked, not copied."""

    def make(*versions: str) -> Path:
        root = tmp_path / "registry"
        for item in versions:
            model, version = item.split("/")
            (root / model).mkdir(parents=True, exist_ok=True)
            (root / model / version).symlink_to(demo_registry / model / version)
        root.mkdir(exist_ok=True)
        return root

    return make
