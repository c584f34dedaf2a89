"""The inference service behind the HTTP handlers: route, call the runner, record, mirror.

Handlers parse and map results to HTTP; this class holds the request logic, so that the
REST endpoints, the simple `/predict` endpoint and the load tests share one path.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from proxy.metrics import Metrics
from proxy.routing import Router, SplitTable
from proxy.shadow import ShadowMirror
from proxy.windows import FeedbackIndex, Outcome, VariantWindow
from serving.errors import (
    InvalidInput,
    ModelExecutionError,
    ServingError,
    UpstreamError,
    UpstreamTimeout,
)
from serving.manifest import Manifest
from serving.registry import LoadedVersion, Registry
from serving.tensors import Tensors, check_inputs

VARIANT_NOTE = "rollguard-variant="  # how a failure says which version failed (see variant_of)


def variant_of(exc: BaseException) -> str | None:
    """The version that failed, when the failure came from a model call."""
    for note in getattr(exc, "__notes__", ()):
        if note.startswith(VARIANT_NOTE):
            return str(note[len(VARIANT_NOTE) :])
    return None


@dataclass(frozen=True, slots=True)
class Answer:
    """What one inference produced, and who produced it."""

    outputs: Tensors
    model: str
    version: str
    role: str  # stable | candidate | pinned
    request_id: str
    manifest: Manifest


def prediction_of(outputs: Mapping[str, np.ndarray]) -> float:
    """The first row's prediction as one number: its label, else argmax, else value."""
    array = outputs.get("label")
    if array is None:
        array = outputs.get("prediction")
    if array is None:
        if not outputs:
            return float("nan")
        array = next(iter(outputs.values()))
        if array.ndim >= 2:
            return float(np.argmax(array[0]))
    if array.size == 0 or array.dtype == object:
        return float("nan")
    return float(array.flat[0])


def _drift_row(window: VariantWindow, inputs: Tensors) -> np.ndarray | None:
    """The first input row, when a drift check watches this version's inputs."""
    if window.input_width is None:
        return None
    first = next(iter(inputs.values()))
    if first.ndim == 2 and first.shape[1] == window.input_width and len(first):
        row: np.ndarray = first[0]
        return row
    return None


def answers_agree(primary: Tensors, shadow: Tensors, tol: float) -> bool:
    """Classifiers agree on every row's label; regressors within `tol`."""
    for name in ("label", "prediction"):
        if name in primary and name in shadow:
            a, b = primary[name], shadow[name]
            if a.shape != b.shape:
                return False
            if name == "label" or a.dtype.kind in "iub":
                return bool(np.array_equal(a, b))
            return bool(np.allclose(a, b, atol=tol, rtol=0))
    common = [n for n in primary if n in shadow]
    if not common:
        return False
    a, b = primary[common[0]], shadow[common[0]]
    if a.shape != b.shape:
        return False
    if a.ndim >= 2 and a.dtype.kind == "f":
        return bool(np.array_equal(a.argmax(axis=1), b.argmax(axis=1)))
    return (
        bool(np.allclose(a, b, atol=tol, rtol=0))
        if a.dtype.kind == "f"
        else bool(np.array_equal(a, b))
    )


class RequestIds:
    """Request ids for requests that bring none: a per-process random prefix and a counter.

    Cheaper than uuid4 on the hot path, and unique across replicas by the prefix.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"


class Windows:
    """The per-(model, version) ring buffers; sized by the rollout that watches them."""

    def __init__(self, default_size: int, tolerance: float) -> None:
        self._default = default_size
        self._tol = tolerance
        self._windows: dict[tuple[str, str], VariantWindow] = {}

    def get(self, model: str, version: str) -> VariantWindow:
        window = self._windows.get((model, version))
        if window is None:
            window = VariantWindow(version, self._default, tol=self._tol)
            self._windows[(model, version)] = window
        return window

    def ensure(
        self, model: str, version: str, size: int, input_width: int | None = None
    ) -> VariantWindow:
        """The window, recreated when a rollout asks for another size or input width."""
        window = self._windows.get((model, version))
        if window is None or window.size != size or window.input_width != input_width:
            window = VariantWindow(version, size, input_width=input_width, tol=self._tol)
            self._windows[(model, version)] = window
        return window

    def items(self) -> list[tuple[tuple[str, str], VariantWindow]]:
        return list(self._windows.items())


class Gateway:
    """Routes, runs and records inference requests for every model in the registry."""

    def __init__(
        self,
        registry: Registry,
        *,
        router: Router | None = None,
        metrics: Metrics | None = None,
        timeout_s: float = 10.0,
        window_size: int = 2000,
        feedback_capacity: int = 100_000,
        shadow: ShadowMirror | None = None,
        agreement_tolerance: float = 1e-6,
        request_ids: RequestIds | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.registry = registry
        self.router = router or Router()
        self.metrics = metrics or Metrics()
        self.windows = Windows(window_size, agreement_tolerance)
        self.feedback_index = FeedbackIndex(feedback_capacity)
        self.shadow = shadow or ShadowMirror(self.metrics)
        self.timeout_s = timeout_s
        self.tolerance = agreement_tolerance
        self._clock = clock
        self.new_request_id = request_ids or RequestIds()

    def primary_version(self, model: str) -> str:
        """The version that answers for the model as a whole: rollout stable, else default."""
        table = self.router.table(model)
        return table.stable if table is not None else self.registry.default_version(model)

    def resolve(self, model: str, key: str | None) -> tuple[SplitTable | None, str, str]:
        """(table, version, role) for a routed request; no table means the default version."""
        table = self.router.table(model)
        if table is None:
            return None, self.registry.default_version(model), "stable"
        version, role = table.choose(key)
        return table, version, role

    async def infer(
        self,
        model: str,
        inputs: Tensors,
        *,
        request_id: str | None = None,
        key: str | None = None,
        version: str | None = None,
        requested: Sequence[str] | None = None,
    ) -> Answer:
        """Run one request. `version` pins it: pinned requests never count in windows."""
        request_id = request_id or self.new_request_id()
        if version is not None:
            loaded = self.registry.get(model, version)
            self._validate(loaded, inputs, requested)
            outputs = await self._call(loaded, inputs)
            return Answer(outputs, model, version, "pinned", request_id, loaded.manifest)
        table, version, role = self.resolve(model, key)
        loaded = self.registry.get(model, version)
        self._validate(loaded, inputs, requested)  # bad input: raised here, counted against no one
        window = self.windows.get(model, version)
        window.count_routed()
        variant = self.metrics.variant(model, version, role)
        variant.inflight.inc()
        start = self._clock()
        try:
            outputs = await self._call(loaded, inputs)
        except UpstreamTimeout:
            self._record_failure(window, model, version, role, start, Outcome.TIMEOUT, "504")
            raise
        except (ModelExecutionError, UpstreamError) as exc:
            code = "502" if isinstance(exc, UpstreamError) else "500"
            self._record_failure(window, model, version, role, start, Outcome.MODEL_ERROR, code)
            raise
        finally:
            variant.inflight.dec()
        latency = self._clock() - start
        seq = window.record(latency, Outcome.OK, prediction_of(outputs), _drift_row(window, inputs))
        self.feedback_index.put(request_id, window, seq)
        variant.ok.inc()
        variant.latency.observe(latency)
        if table is not None and table.shadows:
            for shadow_version in table.shadows:
                if shadow_version != version:
                    self._mirror(model, shadow_version, inputs, outputs, window)
        return Answer(outputs, model, version, role, request_id, loaded.manifest)

    def feedback(self, request_id: str, label: float) -> tuple[str, bool] | None:
        """Attach a ground-truth label; (version, correct) or None if the id is unknown."""
        found = self.feedback_index.pop(request_id)
        if found is None:
            return None
        window, seq = found
        correct = window.feedback(seq, label)
        if correct is None:
            return None
        return window.version, correct

    def _validate(
        self, loaded: LoadedVersion, inputs: Tensors, requested: Sequence[str] | None
    ) -> None:
        manifest = loaded.manifest
        specs = manifest.input_specs
        if specs:
            check_inputs(inputs, specs)
        elif not inputs:
            raise InvalidInput("no inputs given")
        if requested and manifest.outputs:
            declared = {t.name for t in manifest.outputs}
            unknown = [n for n in requested if n not in declared]
            if unknown:
                raise InvalidInput(
                    f"unknown output(s) {unknown}; the model declares {sorted(declared)}"
                )

    async def _call(
        self, loaded: LoadedVersion, inputs: Tensors, limit_s: float | None = None
    ) -> Tensors:
        timeout = limit_s
        if timeout is None:
            http = loaded.manifest.framework == "http"
            timeout = loaded.manifest.timeout_s if http else self.timeout_s
        note = VARIANT_NOTE + loaded.manifest.version
        try:
            async with asyncio.timeout(timeout):
                return await loaded.runner.predict(inputs)
        except TimeoutError:
            name = f"{loaded.manifest.name}/{loaded.manifest.version}"
            timed_out = UpstreamTimeout(f"{name} did not answer within {timeout}s")
            timed_out.add_note(note)
            raise timed_out from None
        except ServingError as exc:
            exc.add_note(note)
            raise
        except Exception as exc:  # a runner bug must still count as that version's error
            failed = ModelExecutionError(f"{type(exc).__name__}: {exc}")
            failed.add_note(note)
            raise failed from exc

    def _record_failure(
        self,
        window: VariantWindow,
        model: str,
        version: str,
        role: str,
        start: float,
        outcome: Outcome,
        code: str,
    ) -> None:
        latency = self._clock() - start
        window.record(latency, outcome, float("nan"))
        self.metrics.requests.labels(model, version, role, code).inc()
        self.metrics.variant(model, version, role).latency.observe(latency)

    def _mirror(
        self,
        model: str,
        version: str,
        inputs: Tensors,
        primary: Tensors,
        primary_window: VariantWindow,
    ) -> None:
        try:
            loaded = self.registry.get(model, version)
        except ServingError:
            self.metrics.shadow.labels(model, version, "unavailable").inc()
            return
        shadow_window = self.windows.get(model, version)

        async def run() -> None:
            start = self._clock()
            try:
                outputs = await self._call(loaded, inputs, self.shadow.timeout_s)
            except UpstreamTimeout:
                shadow_window.record(self._clock() - start, Outcome.TIMEOUT, float("nan"))
                self.metrics.shadow.labels(model, version, "timeout").inc()
                return
            except ServingError:
                shadow_window.record(self._clock() - start, Outcome.MODEL_ERROR, float("nan"))
                self.metrics.shadow.labels(model, version, "error").inc()
                return
            latency = self._clock() - start
            row = _drift_row(shadow_window, inputs)
            shadow_window.record(latency, Outcome.OK, prediction_of(outputs), row)
            agreed = answers_agree(primary, outputs, self.tolerance)
            shadow_window.record_comparison(agreed)
            self.metrics.shadow.labels(model, version, "ok").inc()

        self.shadow.submit(model, version, run)
