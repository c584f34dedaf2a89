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
from typing import Any

import numpy as np

from rollguard.proxy import calls
from rollguard.proxy.answers import answers_agree, drift_row, prediction_of
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.routing import Router
from rollguard.proxy.shadow import ShadowMirror
from rollguard.proxy.windows import FeedbackIndex, Outcome, VariantWindow, Windows
from rollguard.serving.errors import (
    InvalidInput,
    ModelExecutionError,
    ServingError,
    UpstreamError,
    UpstreamTimeout,
)
from rollguard.serving.jsontensors import JsonInputs, as_tensors
from rollguard.serving.manifest import Manifest
from rollguard.serving.registry import LoadedVersion, Registry
from rollguard.serving.tensors import Tensors, check_inputs


@dataclass(slots=True)  # not frozen: a frozen dataclass pays object.__setattr__ per field
class Answer:
    """What one inference produced, and who produced it."""

    outputs: Tensors
    model: str
    version: str
    role: str  # stable | candidate | pinned
    request_id: str
    manifest: Manifest
    # The upstream's output tensors as V2 JSON objects when the client's body was passed
    # through to a remote runner; `outputs` is then empty unless a shadow compared them.
    passthrough: list[dict[str, Any]] | None = None


class RequestIds:
    """Request ids for requests that bring none: a per-process random prefix and a counter.

    Cheaper than uuid4 on the hot path, and unique across replicas by the prefix.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"


class Inference:
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

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        request_id: str | None = None,
        key: str | None = None,
        version: str | None = None,
        requested: Sequence[str] | None = None,
        body: bytes | None = None,
    ) -> Answer:
        """Run one request. `version` pins it: pinned requests never count in windows.

        `body` is the client's V2 JSON body for `inputs`; a runner that passes V2 bodies
        gets it untouched and the answer carries the upstream's outputs as JSON
        (`Answer.passthrough`). Give it only when nothing in it needs rewriting.
        """
        request_id = request_id or self.new_request_id()
        if version is not None:
            loaded = self.registry.get(model, version)
            self._validate(loaded, inputs, requested)
            if body is not None and loaded.runner.passes_v2_bodies:
                outputs, _, passed = await calls.predict_raw(loaded, body, full=False)
                return Answer(
                    outputs, model, version, "pinned", request_id, loaded.manifest, passed
                )
            outputs = await calls.predict(loaded, as_tensors(inputs), None, self.timeout_s)
            return Answer(outputs, model, version, "pinned", request_id, loaded.manifest)
        table = self.router.table(model)
        if table is None:
            version, role = self.registry.default_version(model), "stable"
        else:
            version, role = table.choose(key)
        loaded = self.registry.get(model, version)
        self._validate(loaded, inputs, requested)  # bad input: raised here, counted against no one
        window = self.windows.get(model, version)
        window.count_routed()
        variant = self.metrics.variant(model, version, role)
        # Copies are admitted before the primary runs: a shed one then costs nothing more.
        mirrored = (
            [v for v in table.shadows if v != version and self.shadow.admit(model, v)]
            if table is not None and table.shadows
            else ()
        )
        items: list[dict[str, Any]] | None = None
        variant.inflight += 1
        start = self._clock()
        try:
            if body is not None and loaded.runner.passes_v2_bodies:
                # Shadows compare whole answers, so only then is every output converted.
                outputs, prediction, items = await calls.predict_raw(
                    loaded, body, full=bool(mirrored)
                )
            else:
                outputs = await calls.predict(loaded, as_tensors(inputs), None, self.timeout_s)
                prediction = prediction_of(outputs)
        except UpstreamTimeout:
            self._record_failure(window, model, version, role, start, Outcome.TIMEOUT, "504")
            raise
        except (ModelExecutionError, UpstreamError) as exc:
            code = "502" if isinstance(exc, UpstreamError) else "500"
            self._record_failure(window, model, version, role, start, Outcome.MODEL_ERROR, code)
            raise
        finally:
            variant.inflight -= 1
        latency = self._clock() - start
        seq = window.record(latency, Outcome.OK, prediction, drift_row(window, inputs))
        self.feedback_index.put(request_id, window, seq)
        variant.answered(latency)
        for shadow_version in mirrored:
            self._mirror(model, shadow_version, inputs, outputs, body)
        return Answer(outputs, model, version, role, request_id, loaded.manifest, items)

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
        self,
        loaded: LoadedVersion,
        inputs: Mapping[str, np.ndarray],
        requested: Sequence[str] | None,
    ) -> None:
        manifest = loaded.manifest
        specs = manifest.input_specs
        if specs:  # deferred inputs are checked by their shapes and dtypes, unconverted
            check_inputs(inputs.meta if isinstance(inputs, JsonInputs) else inputs, specs)
        elif not inputs:
            raise InvalidInput("no inputs given")
        if requested and manifest.outputs:
            declared = {t.name for t in manifest.outputs}
            unknown = [n for n in requested if n not in declared]
            if unknown:
                raise InvalidInput(
                    f"unknown output(s) {unknown}; the model declares {sorted(declared)}"
                )

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
        self.metrics.variant(model, version, role).failed(code, latency)

    def _mirror(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, np.ndarray],
        primary: Tensors,
        body: bytes | None,
    ) -> None:
        """Start an admitted shadow call of `version`; a remote one gets the client's `body`."""
        try:
            loaded = self.registry.get(model, version)
        except ServingError:
            self.metrics.shadow.labels(model, version, "unavailable").inc()
            return
        shadow_window = self.windows.get(model, version)

        raw = body if loaded.runner.passes_v2_bodies else None

        async def run() -> None:
            start = self._clock()
            try:
                if raw is None:
                    outputs = await calls.predict(
                        loaded, as_tensors(inputs), self.shadow.timeout_s, self.timeout_s
                    )
                else:
                    async with asyncio.timeout(self.shadow.timeout_s):
                        outputs, _, _ = await calls.predict_raw(loaded, raw, full=True)
            except (UpstreamTimeout, TimeoutError):
                shadow_window.record(self._clock() - start, Outcome.TIMEOUT, float("nan"))
                self.metrics.shadow.labels(model, version, "timeout").inc()
                return
            except ServingError:
                shadow_window.record(self._clock() - start, Outcome.MODEL_ERROR, float("nan"))
                self.metrics.shadow.labels(model, version, "error").inc()
                return
            latency = self._clock() - start
            row = drift_row(shadow_window, inputs)
            shadow_window.record(latency, Outcome.OK, prediction_of(outputs), row)
            agreed = answers_agree(primary, outputs, self.tolerance)
            shadow_window.record_comparison(agreed)
            self.metrics.shadow.labels(model, version, "ok").inc()

        self.shadow.start(run)
