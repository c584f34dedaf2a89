"""Runner factory: picks the framework's runner, importing its library only when needed."""

from __future__ import annotations

from pathlib import Path

from rollguard.serving.hashing import PinnedBytes
from rollguard.serving.manifest import Manifest
from rollguard.serving.runners.base import IMPORT_LOCK, LocalRunner, Runner, Wrapper

__all__ = ["IMPORT_LOCK", "LocalRunner", "Runner", "Wrapper", "create_runner"]


def create_runner(manifest: Manifest, directory: Path, pinned: PinnedBytes | None = None) -> Runner:
    """A not-yet-loaded runner for one registry version, unwrapped (see registry.py).
    A local one loads `pinned` (the verified bytes), or reads and checks them itself."""
    if manifest.framework == "onnx":
        from rollguard.serving.runners.onnx import OnnxRunner

        return OnnxRunner(manifest, directory, pinned)
    if manifest.framework == "torch":
        from rollguard.serving.runners.torch import TorchRunner

        return TorchRunner(manifest, directory, pinned)
    if manifest.framework == "sklearn":
        from rollguard.serving.runners.sklearn import SklearnRunner

        return SklearnRunner(manifest, directory, pinned)
    if manifest.framework == "grpc":
        from rollguard.serving.runners.grpc import GrpcRunner

        return GrpcRunner(manifest, directory)
    from rollguard.serving.runners.http import HttpRunner

    return HttpRunner(manifest, directory)
