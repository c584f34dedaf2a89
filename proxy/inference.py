"""The inference service behind the data port: route, call the runner, record, mirror.

Handlers parse and map results to HTTP; this class holds the request logic, so that the
V2 endpoints, the simple `/predict` endpoint and the load tests share one path. A
request crosses into serving/ twice: to look its version up, and to be answered.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from rollguard.proxy.feedback import FeedbackIndex
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.routing import Router, SplitTable
from rollguard.proxy.shadow import ShadowMirror
from rollguard.proxy.stats import Statistics
from rollguard.proxy.windows import Outcome, VariantWindow, Windows
from rollguard.serving.availability import Availability
from rollguard.serving.bulkhead import in_shadow_lane
from rollguard.serving.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelExecutionError,
    NotReady,
    Overloaded,
    ServingError,
    UpstreamError,
    UpstreamTimeout,
)
from rollguard.serving.manifest import Manifest
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.prediction import Predicted, agree, rows_of
from rollguard.serving.registry import LoadedVersion, Registry
from rollguard.serving.tensors import check_inputs


@dataclass(slots=True)  # not frozen: a frozen dataclass pays object.__setattr__ per field
class Answer:
    """What one inference produced, and who produced it."""

    response: InferResponse
    model: str
    version: str
    role: str  # stable | candidate | pinned
    request_id: str
    manifest: Manifest


class RequestIds:
    """Request ids for requests that bring none: 128 bits from the OS's CSPRNG, as 32 hex
    digits. Unguessable, so that a client cannot label (or look up) another's request.

    The random bytes are drawn in blocks (one `os.urandom` call per 512 ids) and each
    id takes its own 16 bytes: ~0.24 µs an id against ~0.13 µs for a counter and ~2.6 µs
    for `str(uuid4())` (measured on the 2-core CI box).
    A forked child starts a fresh block, so parent and child never share ids.
    """

    _BLOCK = 512  # ids per os.urandom call

    def __init__(self) -> None:
        self._hex = ""
        self._pos = 0
        self._forks = _FORKS[0]

    def __call__(self) -> str:
        pos = self._pos
        if pos >= len(self._hex) or self._forks != _FORKS[0]:
            self._hex, pos, self._forks = os.urandom(16 * self._BLOCK).hex(), 0, _FORKS[0]
        self._pos = pos + 32
        return self._hex[pos : pos + 32]


_FORKS = [0]  # bumped in a forked child: its RequestIds draw a fresh block


def _forked() -> None:
    _FORKS[0] += 1


os.register_at_fork(after_in_child=_forked)


class Inference:
    """Routes, runs and records inference requests for every model in the registry."""

    def __init__(
        self,
        registry: Registry,
        *,
        router: Router,
        metrics: Metrics,
        windows: Windows,
        feedback_capacity: int,
        shadow: ShadowMirror,
        agreement_tolerance: float,
        request_ids: RequestIds,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.registry = registry
        self.router = router
        self.metrics = metrics
        self.windows = windows
        self.feedback_index = FeedbackIndex(feedback_capacity)
        self.shadow = shadow
        self.tolerance = agreement_tolerance
        self._clock = clock
        self.new_request_id = request_ids
        self.stats = Statistics()  # Triton's statistics extension (proxy/stats.py)

    def primary_version(self, model: str) -> str:
        """The version that answers for the model as a whole: rollout stable, else default."""
        table = self.router.table(model)
        return table.stable if table is not None else self.registry.default_version(model)

    async def infer(
        self,
        model: str,
        request: InferRequest,
        *,
        request_id: str,
        key: str | None = None,
        version: str | None = None,
        client: str | None = None,
    ) -> Answer:
        """Run one request. `version` pins it: pinned requests never count in windows."""
        if version is not None:
            loaded = self._get(model, version, "pinned")
            _validate(loaded.manifest, request)
            try:
                response = await loaded.runner.predict(request)
            except Exception as exc:
                if isinstance(exc, NotReady):
                    self._count_unavailable(model, version, "pinned")
                failure = _of_version(exc, version)
                if failure is exc:
                    raise
                raise failure from exc
            return Answer(response, model, version, "pinned", request_id, loaded.manifest)
        table = self.router.table(model)
        failover: str | None = None
        if table is None:
            try:
                version = self.registry.default_version(model)
            except NotReady:
                self._count_unavailable(model, "", "stable")
                raise
            role = "stable"
            loaded = self._get(model, version, role)
        else:
            version, role = table.choose(key)
            if role == "candidate":
                loaded, failover = self._candidate(table, version)
            else:
                loaded = self._get(model, version, role)
        _validate(loaded.manifest, request)  # bad input: raised here, counted against no one
        if failover is not None and table is not None:
            # The split chose the candidate (sample-ratio checks count that); stable answers.
            self.windows.get(model, version).count_routed()
            self.metrics.failover(model, version, failover).inc()
            version, role = table.stable, "stable"
        window = self.windows.get(model, version)
        if failover is None:
            window.count_routed()
        variant = self.metrics.variant(model, version, role)
        # Copies are admitted before the primary runs: a shed one then costs nothing more.
        mirrored = (
            [v for v in table.shadows if v != version and self.shadow.admit(model, v)]
            if table is not None and table.shadows
            else ()
        )
        variant.inflight += 1
        start = self._clock()
        unloaded = False
        try:
            response = await loaded.runner.predict(request)
            prediction = response.prediction(loaded.manifest.prediction_rule)
        except NotReady as exc:
            _of_version(exc, version)
            if role != "candidate" or self._still_loaded(model, version, loaded):
                self._count_unavailable(model, version, role)
                raise
            unloaded = True
        except Exception as exc:
            failure = _of_version(exc, version)
            if isinstance(failure, DeadlineExceeded | UpstreamTimeout):
                self._record_failure(window, model, version, role, start, Outcome.TIMEOUT, "504",
                                     request.rows())  # fmt: skip
            elif isinstance(failure, Overloaded):
                # The version's own bulkhead is full (or its threads all stuck in calls
                # past their deadline): it did not answer in time, as far as a client sees.
                self._record_failure(window, model, version, role, start, Outcome.TIMEOUT, "503",
                                     request.rows())  # fmt: skip
            elif isinstance(failure, ModelExecutionError | UpstreamError):
                code = "502" if isinstance(failure, UpstreamError) else "500"
                self._record_failure(window, model, version, role, start, Outcome.MODEL_ERROR,
                                     code, request.rows())  # fmt: skip
            if failure is exc:
                raise
            raise failure from exc
        finally:
            variant.inflight -= 1
        if unloaded:
            # The registry unloaded the candidate under this call (its files changed): route
            # again; the request path now fails it over to the stable, counted, or finds
            # the candidate's new load.
            return await self.infer(model, request, request_id=request_id, key=key, client=client)
        latency = self._clock() - start
        width = window.input_width
        row = None if width is None else request.first_row(width)
        seq = window.record(latency, Outcome.OK, prediction, row, request.rows())
        self.feedback_index.put(model, client, request_id, window, seq)
        variant.answered(latency)
        for shadow_version in mirrored:
            self._mirror(model, shadow_version, request, response, loaded.manifest)
        return Answer(response, model, version, role, request_id, loaded.manifest)

    def _get(self, model: str, version: str, role: str) -> LoadedVersion:
        """The registry's load of a version that must answer; a NotReady (refused, loading)
        is counted before it becomes the client's 503."""
        try:
            return self.registry.get(model, version)
        except NotReady:
            self._count_unavailable(model, version, role)
            raise

    def _count_unavailable(self, model: str, version: str, role: str) -> None:
        """One 503 because `version` could not answer, by the registry's word on why
        (`version` "": the model has no default version)."""
        if not version:
            reason = "no_production"
        else:
            found = self.registry.availability(model, version)
            # Loaded and ready, yet its runner said not ready: an upstream between probes.
            reason = "unready" if found is Availability.READY else found.value
        self.metrics.unavailable_requests.labels(model, version, role, reason).inc()

    def _still_loaded(self, model: str, version: str, loaded: LoadedVersion) -> bool:
        try:
            return self.registry.get(model, version) is loaded
        except ServingError:
            return False

    def _candidate(self, table: SplitTable, version: str) -> tuple[LoadedVersion, str | None]:
        """The candidate's load, or the stable's and why when the candidate cannot take
        traffic: the table says so, or the registry refused or dropped it since the table
        was published (the rollout shell republishes within its availability poll)."""
        model, reason = table.model, table.failover
        if reason is None:
            found = self.registry.availability(model, version)
            if found is Availability.READY:  # a stale candidate fails over; a stale stable serves
                return self.registry.get(model, version), None
            reason = found.value
        return self._get(model, table.stable, "stable"), reason

    def feedback(
        self, model: str, request_id: str, label: Predicted, *, client: str | None = None
    ) -> tuple[str, bool] | None:
        """Attach a ground-truth label to request `request_id` of `model` made by `client`
        (None: a request without a credential); (version, correct), or None when no such
        request can take a label (unknown, another model's or client's, already labelled)."""
        found = self.feedback_index.pop(model, client, request_id)
        if found is None:
            return None
        window, seq = found
        correct = window.feedback(seq, label)
        if correct is None:
            return None
        return window.version, correct

    def _record_failure(
        self,
        window: VariantWindow,
        model: str,
        version: str,
        role: str,
        start: float,
        outcome: Outcome,
        code: str,
        rows: int,
    ) -> None:
        latency = self._clock() - start
        window.record(latency, outcome, float("nan"), rows=rows)
        self.metrics.variant(model, version, role).failed(code, latency)

    def _mirror(
        self,
        model: str,
        version: str,
        request: InferRequest,
        primary: InferResponse,
        primary_manifest: Manifest,
    ) -> None:
        """Start an admitted shadow call of `version` with the same request."""
        try:
            loaded = self.registry.get(model, version)
        except ServingError:
            self.shadow.count(model, version, "unavailable")
            return
        window = self.windows.get(model, version)
        shadow = self.shadow
        size = request.rows()

        async def run() -> None:
            in_shadow_lane()  # this task's calls take the version's shadow slots and threads
            start = self._clock()
            try:
                async with shadow.deadline():
                    response = await loaded.runner.predict(request)
                rows = rows_of(loaded.manifest.prediction_rule, response.arrays())
            except (DeadlineExceeded, UpstreamTimeout, TimeoutError):
                window.record(self._clock() - start, Outcome.TIMEOUT, float("nan"), rows=size)
                shadow.count(model, version, "timeout")
                return
            except Exception:  # the shadow's own failure, whatever raised it
                window.record(self._clock() - start, Outcome.MODEL_ERROR, float("nan"), rows=size)
                shadow.count(model, version, "error")
                return
            latency = self._clock() - start
            width = window.input_width
            row = None if width is None else request.first_row(width)
            prediction = response.prediction(loaded.manifest.prediction_rule)
            window.record(latency, Outcome.OK, prediction, row, size)
            try:
                primary_rows = rows_of(primary_manifest.prediction_rule, primary.arrays())
            except ServingError:  # the primary's own answer does not convert
                primary_rows = []
            agreed = agree(primary_rows, rows, self.tolerance)
            window.record_comparison(agreed)
            shadow.count(model, version, "ok")

        shadow.start(run)


def _validate(manifest: Manifest, request: InferRequest) -> None:
    specs = manifest.input_specs
    if specs:  # checked by shapes and dtypes, before anything is converted
        check_inputs(request.meta, specs)
    elif not request.meta:
        raise InvalidInput("no inputs given")
    requested = request.outputs
    if requested and manifest.outputs:
        declared = {t.name for t in manifest.outputs}
        unknown = [n for n in requested if n not in declared]
        if unknown:
            raise InvalidInput(
                f"unknown output(s) {unknown}; the model declares {sorted(declared)}"
            )


def _of_version(exc: Exception, version: str) -> Exception:
    """`exc` saying which version failed (`ServingError.version`); a runner bug becomes
    that version's ModelExecutionError, so that it still counts against it."""
    if isinstance(exc, ServingError):
        exc.version = version
        return exc
    failure = ModelExecutionError(f"{type(exc).__name__}: {exc}")
    failure.version = version
    return failure
