"""The one runner interface every framework implements: load, predict, unload."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from concurrent.futures import Executor
from pathlib import Path

from serving.manifest import Manifest
from serving.tensors import Tensors


class Runner(ABC):
    """Takes a batch of named numpy inputs, returns named numpy outputs.

    `predict` never blocks the event loop. Outputs carry every output the model
    produces, batch dimension first; choosing the requested ones is the caller's job.
    """

    # True when `predict_raw` takes a V2 JSON infer body and gives the V2 JSON answer
    # untouched (remote runners): the gateway then forwards bytes instead of tensors.
    passes_v2_bodies = False

    def __init__(self, manifest: Manifest, directory: Path) -> None:
        self.manifest = manifest
        self.directory = directory
        self.ready = False

    @abstractmethod
    async def load(self) -> None:
        """Load the artifact (or connect to the upstream); raise ArtifactError on failure."""

    @abstractmethod
    async def predict(self, inputs: Tensors) -> Tensors:
        """Run one batch; raise ModelExecutionError / UpstreamError on failure."""

    async def predict_raw(self, body: bytes) -> bytes:
        """Forward a V2 JSON infer body; only runners with `passes_v2_bodies` have it."""
        raise NotImplementedError(f"{type(self).__name__} takes tensors, not V2 bodies")

    async def unload(self) -> None:
        """Release what load() took."""
        self.ready = False

    @property
    def artifact_path(self) -> Path:
        assert self.manifest.artifact is not None
        return self.directory / self.manifest.artifact


class LocalRunner(Runner):
    """A runner whose model computes in-process, on executor threads.

    ONNX Runtime, torch and most of scikit-learn release the GIL while computing,
    so a thread pool gives real parallelism without pickling tensors to processes.
    """

    def __init__(
        self, manifest: Manifest, directory: Path, executor: Executor | None = None
    ) -> None:
        super().__init__(manifest, directory)
        self._executor = executor

    async def load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load_sync)
        self.ready = True

    async def predict(self, inputs: Tensors) -> Tensors:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self.predict_sync, inputs
        )

    async def unload(self) -> None:
        self.ready = False
        self._unload_sync()

    @abstractmethod
    def _load_sync(self) -> None:
        """Read the artifact; raise ArtifactError with the reason when it cannot be used."""

    @abstractmethod
    def predict_sync(self, inputs: Tensors) -> Tensors:
        """Compute one batch on the calling thread; raise ModelExecutionError on failure."""

    def _unload_sync(self) -> None:
        """Drop references to the framework's objects."""
