"""The one runner interface every framework implements: load, predict, unload.

`Runner` takes an `InferRequest` and gives an `InferResponse`. A remote runner forwards
the request's V2 body; a local one (`LocalRunner`) computes on its arrays with a
blocking `predict_sync`. Scheduling that call (inline or on threads), deadlines and
micro-batching wrap a runner (`Wrapper`) and keep its interface.

A local runner loads the bytes the registry hashed (`PinnedBytes`), never the path
again; made without them it reads and checks them itself. Loads that import framework
code (the first `import sklearn`, unpickling, which imports the classes a pickle names)
hold `IMPORT_LOCK`: two threads importing scikit-learn at once can see a partially
initialised module (`cannot import name '_MetadataRequester'`).
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from rollguard.serving.hashing import PinnedBytes
from rollguard.serving.manifest import Manifest
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.tensors import Tensors

# One request's answer from `Runner.predict_now_many`, and the seconds it took.
Now = tuple[InferResponse | Exception | None, float]

# One per process: imports are process-wide, so is the race they can lose.
IMPORT_LOCK = threading.RLock()


class Runner(ABC):
    """One version's model: `load`, then `predict` any number of times, then `unload`.

    `predict` never blocks the event loop for longer than its wrapper allows. Answers
    carry every output the model produces, batch dimension first; choosing the requested
    ones is the caller's job.
    """

    def __init__(self, manifest: Manifest, directory: Path) -> None:
        self.manifest = manifest
        self.directory = directory
        self._ready = False

    @property
    def ready(self) -> bool:
        """Loaded and able to answer."""
        return self._ready

    @property
    def probed_ready(self) -> bool:
        """Ready as far as the version's own word goes (an upstream's ready probe),
        whatever its calls did lately: what the gateway's readiness follows. An
        upstream ejected for failed calls is not `ready` (routing fails a candidate's
        share over) but still `probed_ready`: any client can make calls fail."""
        return self.ready

    @abstractmethod
    async def load(self) -> None:
        """Load the artifact (or reach the upstream); ArtifactError on failure."""

    @abstractmethod
    async def predict(self, request: InferRequest) -> InferResponse:
        """Answer one request; ModelExecutionError / UpstreamError on failure."""

    def predict_now(self, request: InferRequest) -> InferResponse | None:
        """The answer computed right now on the calling (event-loop) thread, when `predict`
        would compute it there anyway without waiting for anything (a model measured
        cheap enough to run inline, with a free slot); None when the call must be awaited
        through `predict`. Same answers and failures as `predict`: a shadow copy takes
        this way to skip a task, a deadline and the coroutines of the wrappers around an
        inline call (proxy/shadow.py)."""
        return None

    @property
    def batches_now(self) -> bool:
        """Whether `predict_now_many` may answer several requests in one call right now
        (a model that runs inline and whose outputs split by rows)."""
        return False

    def predict_now_many(self, requests: Sequence[InferRequest]) -> list[Now]:
        """`predict_now` for several requests at once, in as few calls as their inputs
        allow: for each request its answer, its own failure, or None where that one must
        be awaited through `predict` after all, and the seconds it took (the call it
        shared, as a coalesced caller waits for all of it, and its own part). Shadow
        copies held together take this way (proxy/shadow.py); a request never fails for
        another's inputs."""
        return [(None, 0.0)] * len(requests)

    async def unload(self) -> None:
        """Release what load() took."""
        self._ready = False

    def excuse_failure(self, failure: Exception) -> None:
        """`failure`, this version's, was on an input every version fails: take it back
        from whatever counts this version's failures (an upstream's health)."""
        return None  # a model in this process keeps no count of failed calls


class Wrapper(Runner):
    """A runner around another one (scheduling, deadline, batching), same interface."""

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner.manifest, inner.directory)
        self.inner = inner

    @property
    def ready(self) -> bool:
        return self.inner.ready

    @property
    def probed_ready(self) -> bool:
        return self.inner.probed_ready

    async def load(self) -> None:
        await self.inner.load()

    async def unload(self) -> None:
        await self.inner.unload()

    def excuse_failure(self, failure: Exception) -> None:
        self.inner.excuse_failure(failure)


class LocalRunner(Runner):
    """A model that computes in this process: `predict_sync` blocks while it computes.

    ONNX Runtime, torch and most of scikit-learn release the GIL while computing, so
    threads give real parallelism; serving/scheduling.py decides per call whether it runs
    on a thread or, for models measured to answer in microseconds, right on the loop.
    Unwrapped, `predict` runs it on the default executor.
    """

    def __init__(
        self, manifest: Manifest, directory: Path, pinned: PinnedBytes | None = None
    ) -> None:
        super().__init__(manifest, directory)
        self._pinned = pinned

    async def load(self) -> None:
        await asyncio.to_thread(self._load_sync)
        self._ready = True

    def take_pinned(self) -> PinnedBytes:
        """The verified bytes to load: those handed in (then dropped, so the buffer is not
        kept beside the loaded model), else read and checked now (ArtifactError)."""
        pinned, self._pinned = self._pinned, None
        if pinned is None:
            pinned = PinnedBytes.read(self.directory, self.manifest)
        return pinned

    async def predict(self, request: InferRequest) -> InferResponse:
        outputs = await asyncio.to_thread(self.predict_sync, request.arrays())
        return InferResponse.of_arrays(outputs)

    async def unload(self) -> None:
        self._ready = False
        self._unload_sync()

    @property
    def artifact_path(self) -> Path:
        assert self.manifest.artifact is not None
        return self.directory / self.manifest.artifact

    @abstractmethod
    def _load_sync(self) -> None:
        """Read the artifact; raise ArtifactError with the reason when it cannot be used."""

    @abstractmethod
    def predict_sync(self, inputs: Tensors) -> Tensors:
        """Compute one batch on the calling thread; raise ModelExecutionError on failure."""

    def predict_stoppable(self, inputs: Tensors, call: object) -> Tensors:
        """predict_sync on a thread whose caller may give up on it (its deadline): a
        runtime that can stop a call part-way (ONNX Runtime) lets `give_up(call)` stop
        it; by default it is predict_sync, and a call given up on runs to its end.
        `call` is the caller's own token for this one call, alive until it returns."""
        return self.predict_sync(inputs)

    def give_up(self, call: object) -> None:
        """Stop the `predict_stoppable` call of that token if it still runs and the
        runtime can; it then fails with ModelExecutionError, which nobody waits for."""

    def _unload_sync(self) -> None:
        """Drop references to the framework's objects."""
