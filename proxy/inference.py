"""The inference service behind the data port: route, call the runner, record, mirror.

Handlers parse and map results to HTTP; this class holds the request logic, so that the
V2 endpoints, the simple `/predict` endpoint and the load tests share one path. A
request crosses into serving/ twice: to look its version up, and to be answered.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rollguard.proxy.feedback import FeedbackIndex, Missing
from rollguard.proxy.metrics import Metrics
from rollguard.proxy.routing import Router, SplitTable
from rollguard.proxy.shadow import Held, ShadowMirror
from rollguard.proxy.stats import Statistics
from rollguard.proxy.windows import Outcome, VariantWindow, Windows
from rollguard.serving.availability import Availability
from rollguard.serving.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelExecutionError,
    NotReady,
    Overloaded,
    ServingError,
    UpstreamError,
    UpstreamTimeout,
    VersionNotFound,
    WorkerLost,
)
from rollguard.serving.manifest import Manifest
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.prediction import NAN, Predicted, Rule, agreeing, rows_of
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
        feedback_max_age_s: float,
        shadow: ShadowMirror,
        agreement_tolerance: float,
        request_ids: RequestIds,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.registry = registry
        self.router = router
        self.metrics = metrics
        self.windows = windows
        self.feedback_index = FeedbackIndex(feedback_capacity, feedback_max_age_s)
        self.shadow = shadow
        self.tolerance = agreement_tolerance
        self._clock = clock
        self.new_request_id = request_ids
        self.stats = Statistics()  # Triton's statistics extension (proxy/stats.py)

    def primary_version(self, model: str) -> str:
        """The version that answers for the model as a whole: the rollout's stable, else
        (no rollout, or a stable the registry has no load of: `_stable`) the default."""
        table = self.router.table(model)
        if table is None:
            return self.registry.default_version(model)
        if self.registry.availability(model, table.stable) in _LOADED:
            return table.stable
        return self._stand_in(table) or table.stable

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
                loaded, version = self._stable(table)
                if version != table.stable:
                    table = None  # answered outside the rollout: counted in neither arm
        _validate(loaded.manifest, request)  # bad input: raised here, counted against no one
        # Sample-ratio checks count the split's units: keys when it hashed one.
        unit = key if table is not None and table.split == "hash" else None
        if failover is not None and table is not None:
            # The split chose the candidate (sample-ratio checks count that); stable answers.
            self.windows.get(model, version).count_routed(unit)
            self.metrics.failover(model, version, failover).inc()
            # The stable, or the model's default when the stable cannot serve (`_stable`).
            version, role = loaded.manifest.version, "stable"
        window = self.windows.get(model, version)
        if failover is None:
            window.count_routed(unit)
        # The stratum the conditional tests count this request in (policy/conditional.py):
        # the configured weight it was routed at, 0 while the candidate's share fails over.
        routed = table is not None and failover is None and table.failover is None
        share = table.weight if routed and table is not None else 0.0
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
        runner = loaded.runner
        try:
            # An inline version's answer at once, without its wrappers' coroutines.
            now = runner.predict_now(request)
            response = now if now is not None else await runner.predict(request)
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
                                     request.rows(), share, unit)  # fmt: skip
            elif isinstance(failure, Overloaded):
                # The version's own bulkhead is full (or its threads all stuck in calls
                # past their deadline): it did not answer in time, as far as a client sees.
                self._record_failure(window, model, version, role, start, Outcome.TIMEOUT, "503",
                                     request.rows(), share, unit)  # fmt: skip
            elif isinstance(failure, ModelExecutionError | UpstreamError):
                failed_at = self._clock()
                code = "502" if isinstance(failure, UpstreamError) else "500"
                try:
                    shared = table is not None and await self._other_fails_too(
                        table, version, failure, request
                    )
                except BaseException:  # cancelled while asking: the failure still counts
                    self._record_failure(window, model, version, role, start,
                                         Outcome.MODEL_ERROR, code, request.rows(), share,
                                         unit, failed_at)  # fmt: skip
                    raise
                if shared and table is not None:
                    # Every version fails this input: it is the input's fault (or a fault
                    # the versions share); it counts against neither, and fails no upstream.
                    runner.excuse_failure(failure)
                    self.metrics.shared_failures.labels(model, role).inc()
                    raise _shared(failure, table) from exc
                self._record_failure(window, model, version, role, start, Outcome.MODEL_ERROR,
                                     code, request.rows(), share, unit, failed_at)  # fmt: skip
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
        rows = request.rows()
        # The version's time: not the turn's other requests' while it waited for a call
        # shared with them (serving/scheduling.py), which the busier arm would pay more.
        window.record(latency - request.shared_wait_s, _OK, row=row, rows=rows, share=share,
                      key=unit)  # fmt: skip
        rule = loaded.manifest.prediction_rule
        predictions = (
            (response.prediction(rule),) if rows == 1 else _row_predictions(rule, response, rows)
        )
        self.feedback_index.put(model, client, request_id, window, predictions, share)
        variant.answered(latency)
        for shadow_version in mirrored:
            self._mirror(model, shadow_version, request, predictions)
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

    async def _other_fails_too(
        self, table: SplitTable, version: str, failure: Exception, request: InferRequest
    ) -> bool:
        """Whether the rollout's other version (stable for the candidate, the candidate for
        the stable) fails `request` too, as a model error or an upstream error: asked once,
        counted nowhere (an upstream failure or timeout of that call is excused from its
        health). False when it answers, refuses the input by its own declared inputs,
        times out, is overloaded or cannot take traffic: nothing then says the input is at
        fault. Not asked when the version's worker process died on the input (a poison
        input must not kill the other's worker too), nor when the other takes no routed
        traffic (a rolled-back or shadow candidate says nothing for the stable)."""
        other = table.stable if version != table.stable else table.candidate
        if (
            other is None
            or other == version
            or isinstance(failure, WorkerLost)
            or table.failover is not None
            or (other == table.candidate and table.weight <= 0)
        ):
            return False
        if self.registry.availability(table.model, other) is not Availability.READY:
            return False
        loaded = self.registry.get(table.model, other)
        try:
            _validate(loaded.manifest, request)
            await loaded.runner.predict(request)
        except InvalidInput:
            return False  # its own inputs differ: that says nothing about this failure
        except Exception as exc:
            second = _of_version(exc, other)
            if isinstance(second, UpstreamError):
                loaded.runner.excuse_failure(second)  # never charged for being asked
            return isinstance(second, ModelExecutionError | UpstreamError) and not isinstance(
                second, UpstreamTimeout | WorkerLost
            )
        return False

    def _stable(self, table: SplitTable) -> tuple[LoadedVersion, str]:
        """The stable's load and version; when the registry has none for it (a policy
        naming a version that is not there, or refused, or whose directory was removed),
        the model's default version's, as if it had no rollout, counted in
        rollguard_failover_requests_total{reason="stable_<why>"}. Raises as `_get` when
        the default is that stable too, or the candidate (which must not answer for it)."""
        model, stable = table.model, table.stable
        try:
            return self.registry.get(model, stable), stable
        except (NotReady, VersionNotFound):
            default = self._stand_in(table)
            if default is None:
                return self._get(model, stable, "stable"), stable
        why = self.registry.availability(model, stable).value
        self.metrics.failover(model, stable, f"stable_{why}").inc()
        return self._get(model, default, "stable"), default

    def _stand_in(self, table: SplitTable) -> str | None:
        """The version that answers for a stable the registry has no load of: the model's
        default, unless there is none or it is that stable or the rollout's candidate."""
        try:
            default = self.registry.default_version(table.model)
        except NotReady:
            return None
        return None if default in (table.stable, table.candidate) else default

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
        return self._stable(table)[0], reason

    def feedback(
        self,
        model: str,
        labels: Sequence[tuple[str, tuple[Predicted, ...]]],
        *,
        client: str | None = None,
    ) -> Labelled:
        """Attach ground-truth labels, a label per row, to requests of `model` made by
        `client` (None: requests without a credential).

        All or nothing for bad input: a label count that is not the request's row count
        is an InvalidInput naming the count expected, and no label is applied. An id
        that names no request that can take a label is unknown (never indexed, another
        model's or client's, already labelled) or expired (forgotten by the index's
        bounds; counted per model)."""
        index = self.feedback_index
        for i, (request_id, given) in enumerate(labels):
            found = index.find(model, client, request_id)
            if not isinstance(found, Missing) and len(found) != len(given):
                rows = len(found)
                expected = "1 label" if rows == 1 else f"a list of {rows} labels"
                raise InvalidInput(
                    f"feedback[{i}]: request {request_id!r} had {rows} row(s): "
                    f"its label must be {expected}, one per row; got {len(given)}"
                )
        result = Labelled()
        for request_id, given in labels:
            taken = index.take(model, client, request_id)
            if taken is Missing.EXPIRED:
                result.expired.append(request_id)
                self.metrics.feedback_expired.labels(model).inc()
                continue
            if isinstance(taken, Missing):
                result.unknown.append(request_id)  # a repeat in this call: already taken
                continue
            window, generation, predictions, share = taken
            counted, correct = window.label(generation, predictions, given, share)
            counter = self.metrics.feedback
            if correct:
                counter.labels(model, window.version, "correct").inc(correct)
            if counted > correct:
                counter.labels(model, window.version, "wrong").inc(counted - correct)
            result.accepted.append(request_id)
        return result

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
        share: float = 0.0,
        key: str | None = None,
        failed_at: float | None = None,
    ) -> None:
        latency = (self._clock() if failed_at is None else failed_at) - start
        window.record(latency, outcome, rows=rows, share=share, key=key)
        self.metrics.variant(model, version, role).failed(code, latency)

    def _mirror(
        self,
        model: str,
        version: str,
        request: InferRequest,
        primary: Sequence[Predicted],
    ) -> None:
        """Start an admitted shadow call of `version` with the same request; its answer
        is compared row by row with the primary's predictions, as the request path read
        them for feedback (NaN where the primary's answer holds none)."""
        try:
            loaded = self.registry.get(model, version)
        except ServingError:
            self.shadow.count(model, version, "unavailable")
            return
        window = self.windows.get(model, version)
        shadow = self.shadow
        size = request.rows()
        rule = loaded.manifest.prediction_rule
        runner = loaded.runner

        def answered(latency: float, response: InferResponse) -> None:
            rows = rows_of(rule, response.arrays())
            width = window.input_width
            row = None if width is None else request.first_row(width)
            window.record(latency, Outcome.OK, row=row, rows=size)
            # Every row is compared: a batch of 64 counts 64 comparisons, as it is 64 answers.
            compared = max(len(primary), len(rows), 1)
            window.record_comparison(agreeing(primary, rows, self.tolerance), compared)
            shadow.count(model, version, "ok")

        def unloaded() -> bool:  # under the copy (a reload): no failure of the version's
            if runner.ready:
                return False
            shadow.count(model, version, "unavailable")
            return True

        def failed(latency: float) -> None:  # the shadow's own failure, whatever raised it
            if not unloaded():
                window.record(latency, Outcome.MODEL_ERROR, rows=size)
                shadow.count(model, version, "error")

        async def run() -> None:  # on a shadow worker: its calls take the shadow lane
            start = self._clock()
            try:
                async with shadow.deadline():
                    response = await runner.predict(request)
                answered(self._clock() - start, response)
            except (DeadlineExceeded, UpstreamTimeout, TimeoutError):
                if not unloaded():
                    window.record(self._clock() - start, Outcome.TIMEOUT, rows=size)
                    shadow.count(model, version, "timeout")
            except Exception:
                failed(self._clock() - start)

        if runner.batches_now:  # answered with the copies held with it, in one call
            shadow.hold(Held(runner, request, answered, failed, run))
            return

        def now() -> bool:  # a callback in the shadow lane: the answer if it is at hand
            start = self._clock()
            try:
                response = runner.predict_now(request)
                if response is None:
                    return False
                answered(self._clock() - start, response)
            except Exception:
                failed(self._clock() - start)
            return True

        shadow.soon(now, run)


@dataclass(slots=True)
class Labelled:
    """Which request ids of one feedback call took their labels, and which could not."""

    accepted: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)


_LOADED = frozenset({Availability.READY, Availability.UNREADY, Availability.STALE})
_OK = Outcome.OK  # a module constant: an enum member's lookup costs more, per request


def _row_predictions(rule: Rule, response: InferResponse, rows: int) -> tuple[Predicted, ...]:
    """The prediction of each of the request's `rows` rows (NaN where the answer holds
    none): row 0 straight off the answer for a one-row request (the request path reads
    that one inline), every row read from its arrays for a batch."""
    if rows == 1:
        return (response.prediction(rule),)
    try:
        found = rows_of(rule, response.arrays())
    except ServingError:  # an answer that does not convert holds no prediction
        found = []
    if len(found) != rows:
        found = (found + [NAN] * rows)[:rows]
    return tuple(found)


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


def _shared(failure: Exception, table: SplitTable) -> Exception:
    """The client's error for a failure both of a rollout's versions made on one request:
    a model error is the input's fault (400); an upstream error stays a 502 (two
    upstreams failing alike may be an outage they share, not the input)."""
    both = f"{table.stable} and {table.candidate}"
    shared: ServingError
    if isinstance(failure, UpstreamError):
        shared = UpstreamError(f"{failure} (versions {both} both failed this request)")
    else:
        shared = InvalidInput(
            f"no version of model {table.model!r} can run this input ({both} both "
            f"failed on it): {failure}"
        )
    shared.version = getattr(failure, "version", None)
    return shared


def _of_version(exc: Exception, version: str) -> Exception:
    """`exc` saying which version failed (`ServingError.version`); a runner bug becomes
    that version's ModelExecutionError, so that it still counts against it."""
    if isinstance(exc, ServingError):
        exc.version = version
        return exc
    failure = ModelExecutionError(f"{type(exc).__name__}: {exc}")
    failure.version = version
    return failure
