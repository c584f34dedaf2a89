"""Runner factory: picks the framework's runner, importing its library only when needed."""

from __future__ import annotations

from concurrent.futures import Executor
from pathlib import Path

from rollguard.serving.manifest import Manifest
from rollguard.serving.runners.base import LocalRunner, Runner

__all__ = ["LocalRunner", "Runner", "create_runner"]


def create_runner(
    manifest: Manifest,
    directory: Path,
    *,
    executor: Executor | None = None,
    inline_below_us: float = 0.0,
) -> Runner:
    """A not-yet-loaded runner for one registry version.

    In-process runners run a model on the caller's thread once its calls average under
    `inline_below_us` (0: always on the executor); see LocalRunner.
    """
    if manifest.framework == "onnx":
        from rollguard.serving.runners.onnx import OnnxRunner

        return OnnxRunner(manifest, directory, executor, inline_below_us)
    if manifest.framework == "torch":
        from rollguard.serving.runners.torch import TorchRunner

        return TorchRunner(manifest, directory, executor, inline_below_us)
    if manifest.framework == "sklearn":
        from rollguard.serving.runners.sklearn import SklearnRunner

        return SklearnRunner(manifest, directory, executor, inline_below_us)
    from rollguard.serving.runners.http import HttpRunner

    return HttpRunner(manifest, directory)
