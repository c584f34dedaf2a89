"""Runner factory: picks the framework's runner, importing its library only when needed."""

from __future__ import annotations

from pathlib import Path

from rollguard.serving.manifest import Manifest
from rollguard.serving.runners.base import LocalRunner, Runner, Wrapper

__all__ = ["LocalRunner", "Runner", "Wrapper", "create_runner"]


def create_runner(manifest: Manifest, directory: Path) -> Runner:
    """A not-yet-loaded runner for one registry version, unwrapped (see registry.py)."""
    if manifest.framework == "onnx":
        from rollguard.serving.runners.onnx import OnnxRunner

        return OnnxRunner(manifest, directory)
    if manifest.framework == "torch":
        from rollguard.serving.runners.torch import TorchRunner

        return TorchRunner(manifest, directory)
    if manifest.framework == "sklearn":
        from rollguard.serving.runners.sklearn import SklearnRunner

        return SklearnRunner(manifest, directory)
    from rollguard.serving.runners.http import HttpRunner

    return HttpRunner(manifest, directory)
