"""Runner factory: picks the framework's runner, importing its library only when needed."""

from __future__ import annotations

from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING

from serving.manifest import Manifest
from serving.runners.base import LocalRunner, Runner

if TYPE_CHECKING:
    import aiohttp

__all__ = ["LocalRunner", "Runner", "create_runner"]


def create_runner(
    manifest: Manifest,
    directory: Path,
    *,
    executor: Executor | None = None,
    http_session: aiohttp.ClientSession | None = None,
) -> Runner:
    """A not-yet-loaded runner for one registry version."""
    if manifest.framework == "onnx":
        from serving.runners.onnx import OnnxRunner

        return OnnxRunner(manifest, directory, executor)
    if manifest.framework == "torch":
        from serving.runners.torch import TorchRunner

        return TorchRunner(manifest, directory, executor)
    if manifest.framework == "sklearn":
        from serving.runners.sklearn import SklearnRunner

        return SklearnRunner(manifest, directory, executor)
    from serving.runners.http import HttpRunner

    return HttpRunner(manifest, directory, session=http_session)
