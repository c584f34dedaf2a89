"""The model registry: watches root/<model>/<version>/, loads verified versions, answers lookups.

The directory is polled, not watched with inotify: polling sees Kubernetes-style
atomic symlink swaps and works on network filesystems. Each scan fingerprints every
version directory (name, device, inode, size and mtime of each visible file, symlinks
followed) and looks again only where a fingerprint changed, or where a retry is due.

Looking at a version reads each file it pins once (model.yaml's artifact and `files`),
checks each sha256 over the bytes read, and hands those very bytes to the runner
(serving/hashing.py): what was hashed is what is loaded. When verification fails, the
version is given one more scan to settle, because a copy may still be in progress; if
it fails again with the same files (or verified files fail to load) it is refused: one
WARNING line `refused <model>/<version>: <reason>`. A refused version is looked at again with
back-off (after 1, 2, 4 ... poll intervals, at most 32), so a failure whose cause is
not in its files (a module its pickle needs installed later, an upstream coming up)
heals without a file change; a change of its files is looked at on the next scan.

A version that was serving keeps serving its last verified load when its files change
to something bad (wrong bytes, deleted artifact, broken model.yaml): the refusal is
logged, the version is `STALE` (serving/availability.py) until a good change replaces
it or its good files come back. A changed version that verifies is loaded beside the
old one and swapped in before the old one is unloaded, so it never stops serving;
files that change but keep the same manifest and sha256 (a touch, a ConfigMap re-sync)
cause no reload. Only removing its directory unloads a version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rollguard.serving.availability import Availability
from rollguard.serving.bulkhead import Bulkhead, Isolation
from rollguard.serving.catalog import (
    Fingerprint,
    read_version,
    scan_versions,
    version_key,
)
from rollguard.serving.deadlines import Deadline
from rollguard.serving.errors import ModelNotFound, NotReady, ServingError, VersionNotFound
from rollguard.serving.manifest import Manifest
from rollguard.serving.outputs import CheckedOutputs
from rollguard.serving.runners import LocalRunner, Runner, create_runner
from rollguard.serving.scheduling import Scheduled

logger = logging.getLogger(__name__)

_Key = tuple[str, str]
_MAX_BACKOFF_POLLS = 32  # a refused version is looked at again at least this often
_LOOKS_AT_ONCE = 4  # versions read and loaded at once: each holds its files in memory


@dataclass(frozen=True, slots=True)
class LoadedVersion:
    """A verified version whose runner is loaded and serving."""

    manifest: Manifest
    runner: Runner
    directory: Path
    loaded_at: datetime
    reference: bytes | None = None  # the verified bytes of the manifest's `reference`


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: str
    manifest: Manifest | None


@dataclass(frozen=True, slots=True)
class _Retry:
    attempts: int  # refusals in a row of the same files
    due: float  # clock() time of the next look


@dataclass(frozen=True, slots=True)
class _Outcome:
    """The result of examining one version directory."""

    # Neither `loaded` nor `reason`: same manifest and artifact as the one serving.
    loaded: LoadedVersion | None = None  # a new runner, loaded
    reason: str | None = None  # failure
    final: bool = False  # failure that waiting cannot cure (the files verified)
    manifest: Manifest | None = None


def _naming_the_file(reason: str, directory: Path, manifest: Manifest) -> str:
    """A runner's reason, made to start with the artifact's full path if it lacks it."""
    if manifest.artifact is None or reason.startswith(str(directory / manifest.artifact)):
        return reason  # http: the reason names the endpoint URL
    if reason.startswith(manifest.artifact):
        return f"{directory}/{reason}"
    return f"{directory / manifest.artifact}: {reason}"


class Registry:
    """Versions under `root`, kept loaded in step with the directory."""

    def __init__(
        self,
        root: Path,
        *,
        threads: int,
        poll_interval: float,
        inline_below_us: float,
        timeout_s: float,
        isolation: Isolation | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Each local version computes on `threads` threads of its own;
        `inline_below_us` lets cheap ones run on the loop (serving/scheduling.py);
        `timeout_s` bounds each local call (an `http` version's own `timeout_s` bounds
        its calls); `isolation` sizes each version's bulkhead; `clock` times retries."""
        self.root = root
        self.isolation = isolation or Isolation()
        self.inline_below_us = inline_below_us
        self.poll_interval = poll_interval
        self.timeout_s = timeout_s
        self.threads = threads
        self._clock = clock
        self._loaded: dict[_Key, LoadedVersion] = {}  # the last verified load of each
        self._defaults: dict[str, str] = {}  # model -> default version; cleared on any change
        self._refused: dict[_Key, _Refusal] = {}  # its current files; loaded too: stale
        self._pending: dict[_Key, tuple[Fingerprint, str]] = {}  # failed once, settling
        self._settled: dict[_Key, Fingerprint] = {}  # files behind the loaded/refused state
        self._retries: dict[_Key, _Retry] = {}  # refused: when to look again
        self._examining: set[_Key] = set()  # being read and loaded right now
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()  # replaced loads, unloading when idle
        self._stopping = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._root_missing = False

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Scan and load what is there, then keep polling in the background."""
        self._stopping.clear()
        await self.refresh()
        if self._pending:
            # At start-up the files are what they are: a second look refuses what still
            # fails now, instead of one poll interval later.
            await self.refresh()
        self._watcher = asyncio.create_task(self._watch(), name=f"registry watcher {self.root}")

    async def stop(self) -> None:
        """Stop polling (letting a scan in progress finish) and unload every version."""
        self._stopping.set()
        if self._watcher is not None:
            await self._watcher
            self._watcher = None
        async with self._lock:
            if self._retiring:
                await asyncio.gather(*self._retiring, return_exceptions=True)
            for key in list(self._loaded):
                await self._loaded.pop(key).runner.unload()
                self._defaults.clear()
            self._refused.clear()
            self._pending.clear()
            self._settled.clear()
            self._retries.clear()

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            try:
                await self.refresh()
            except Exception:  # the watcher must outlive any one bad scan
                logger.exception("registry scan of %s failed", self.root)

    # --- scanning ----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Scan the directory once now and bring the loaded versions in step with it."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            seen = await loop.run_in_executor(None, scan_versions, self.root)
            if seen is None:
                # A missing root is more likely an unmounted volume than a wish to stop
                # serving everything: keep what is loaded and say so once.
                if not self._root_missing:
                    logger.warning(
                        "registry root %s is missing or not a directory; keeping the %d "
                        "loaded version(s)", self.root, len(self._loaded),
                    )  # fmt: skip
                self._root_missing = True
                return
            self._root_missing = False
            for key in self._known() - set(seen):
                await self._forget(key)
            now = self._clock()
            todo = [(key, d, fp) for key, (d, fp) in seen.items() if self._needs_look(key, fp, now)]
            self._examining.update(key for key, _, _ in todo)
            try:
                limit = asyncio.Semaphore(_LOOKS_AT_ONCE)
                outcomes = await asyncio.gather(
                    *(self._examine(key, d, limit) for key, d, _ in todo)
                )
                for (key, _, fp), outcome in zip(todo, outcomes, strict=True):
                    await self._apply(key, fp, outcome)
            finally:
                self._examining.clear()

    def _known(self) -> set[_Key]:
        return self._loaded.keys() | self._refused.keys() | self._pending.keys()

    def _needs_look(self, key: _Key, fingerprint: Fingerprint, now: float) -> bool:
        retry = self._retries.get(key)
        return (
            key in self._pending
            or (retry is not None and retry.due <= now)
            or self._settled.get(key) != fingerprint
        )

    async def _examine(self, key: _Key, directory: Path, limit: asyncio.Semaphore) -> _Outcome:
        async with limit:
            return await self._read_and_load(key, directory)

    async def _read_and_load(self, key: _Key, directory: Path) -> _Outcome:
        loop = asyncio.get_running_loop()
        try:  # reading and hashing whole files: off the event loop, off the model executor
            manifest, pinned = await loop.run_in_executor(None, read_version, directory, *key)
        except ServingError as exc:
            return _Outcome(reason=str(exc))
        except Exception as exc:  # e.g. the directory changed under us mid-read
            return _Outcome(reason=f"{directory}: {type(exc).__name__}: {exc}")
        current = self._loaded.get(key)
        if current is not None and current.manifest == manifest:
            return _Outcome()  # same manifest, same sha256s: the same bytes are serving
        reference = pinned.files.get(manifest.reference) if manifest.reference else None
        try:
            runner = self._compose(create_runner(manifest, directory, pinned))
            del pinned  # the runner drops its copy once loaded; keep no other
            await runner.load()
        except Exception as exc:  # a runner may raise anything its framework raises
            reason = _naming_the_file(str(exc) or type(exc).__name__, directory, manifest)
            return _Outcome(reason=reason, final=True, manifest=manifest)
        loaded = LoadedVersion(manifest, runner, directory, datetime.now(UTC), reference)
        return _Outcome(loaded=loaded)

    def _compose(self, runner: Runner) -> Runner:
        """The framework runner wrapped as the manifest asks, then put behind its own
        bulkhead: a local one scheduled on its own threads with its time limit (inline
        when cheap, never when batched: a batched version is one whose calls are worth
        queueing for), or in worker processes of its own with `runtime: {isolation:
        process}`, then batched, then its answers checked against its declared
        outputs (serving/outputs.py)."""
        manifest = runner.manifest
        local = isinstance(runner, LocalRunner)
        if isinstance(runner, LocalRunner) and manifest.runtime.get("isolation") == "process":
            # Imported here: worker processes (multiprocessing) and batching are only
            # paid for by a gateway that serves such a version.
            from rollguard.serving.isolation import ProcessIsolated

            # Worker processes of its own, killed at the deadline (serving/isolation.py).
            runner = ProcessIsolated(
                runner,
                int(manifest.runtime.get("workers", self.threads)),
                self.timeout_s,
                shadow_workers=self.isolation.shadow_threads,
            )
        elif isinstance(runner, LocalRunner):
            inline = 0.0 if manifest.batching else self.inline_below_us
            runner = Scheduled(
                runner,
                self.threads,
                inline,
                self.timeout_s,
                shadow_threads=self.isolation.shadow_threads,
                # Half the version's slots at most wait for a coalesced call: the rest
                # answer at once once it is full, and never queue for a slot.
                coalesce_rows=min(Scheduled.COALESCE_ROWS, self.isolation.concurrency // 2),
            )
        if manifest.batching is not None:
            from rollguard.serving.batching import BatchingRunner

            batched = BatchingRunner(
                runner,
                max_batch_size=manifest.batching.max_batch_size,
                max_delay_ms=manifest.batching.max_delay_ms,
                max_concurrent_batches=manifest.batching.max_concurrent_batches,
            )
            # A remote runner's pool times its calls out (the manifest's timeout_s), a
            # scheduled one its thread calls; a queued caller is bounded here.
            runner = Deadline(batched, self.timeout_s)
        if manifest.outputs or local:  # each caller's own answer, after a batch is split
            runner = CheckedOutputs(runner, local=local)  # local: no NaN, declared or not
        isolation = self.isolation
        return Bulkhead(
            runner,
            concurrency=isolation.concurrency,
            queue=isolation.queue,
            shadow_concurrency=isolation.shadow_concurrency,
            shadow_queue=isolation.shadow_queue,
        )

    async def _apply(self, key: _Key, fingerprint: Fingerprint, outcome: _Outcome) -> None:
        label = "/".join(key)
        if outcome.reason is None:
            self._pending.pop(key, None)
            self._retries.pop(key, None)
            if self._refused.pop(key, None) is not None and outcome.loaded is None:
                logger.info("%s: its files verify again; serving them", label)
            self._settled[key] = fingerprint
            if outcome.loaded is not None:
                old = self._loaded.get(key)
                self._loaded[key] = outcome.loaded
                self._defaults.clear()
                manifest = outcome.loaded.manifest
                logger.info(
                    "%s %s (%s, %s)", "reloaded" if old else "loaded", label,
                    manifest.framework, manifest.stage,
                )  # fmt: skip
                if old is not None:
                    self._retire(old)
            return
        settled = (
            outcome.final
            or self._pending.get(key, ((), ""))[0] == fingerprint
            or (key in self._refused and self._settled.get(key) == fingerprint)
        )
        if not settled:
            logger.debug("waiting for %s to settle: %s", label, outcome.reason)
            self._pending[key] = (fingerprint, outcome.reason)
            return
        self._pending.pop(key, None)
        previous = self._refused.get(key)
        retry = self._retries.get(key)
        same_files = retry is not None and self._settled.get(key) == fingerprint
        attempts = retry.attempts + 1 if retry is not None and same_files else 1
        delay = self.poll_interval * min(2 ** (attempts - 1), _MAX_BACKOFF_POLLS)
        self._retries[key] = _Retry(attempts, self._clock() + delay)
        self._settled[key] = fingerprint
        self._refused[key] = _Refusal(outcome.reason, outcome.manifest)
        if previous is not None and previous.reason == outcome.reason:
            logger.debug("%s still refused (attempt %d): %s", label, attempts, outcome.reason)
            return
        serving = self._loaded.get(key)
        if serving is not None:
            logger.warning(
                "refused %s: %s (still serving its last verified load, from %s)",
                label, outcome.reason, serving.loaded_at.isoformat(timespec="seconds"),
            )  # fmt: skip
        else:
            logger.warning("refused %s: %s", label, outcome.reason)

    def _retire(self, old: LoadedVersion) -> None:
        """Unload a replaced load in the background, once the requests it already took
        are answered (they were routed to it before the reload), within the call limit."""
        runner = old.runner
        if isinstance(runner, Bulkhead):
            task = asyncio.get_running_loop().create_task(runner.retire(self.timeout_s))
        else:
            task = asyncio.get_running_loop().create_task(runner.unload())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _forget(self, key: _Key) -> None:
        self._refused.pop(key, None)
        self._pending.pop(key, None)
        self._settled.pop(key, None)
        self._retries.pop(key, None)
        old = self._loaded.pop(key, None)
        self._defaults.clear()
        if old is not None:
            logger.info("unloaded %s: its directory is gone", "/".join(key))
            self._retire(old)

    # --- queries -----------------------------------------------------------------------

    def models(self) -> list[str]:
        """Every model with at least one version directory, loaded or not."""
        return sorted({model for model, _ in self._known()})

    def versions(self, model: str) -> list[str]:
        """The model's loaded versions (stale ones too), in natural version order."""
        if model not in self.models():
            raise ModelNotFound(f"model {model!r} is not in the registry")
        return sorted((v for m, v in self._loaded if m == model), key=version_key)

    def get(self, model: str, version: str) -> LoadedVersion:
        """A version's last verified load (stale or not); ModelNotFound, VersionNotFound,
        or NotReady saying why not (the reason, which names files, is in the log)."""
        key = (model, version)
        if key in self._loaded:
            return self._loaded[key]
        if key in self._refused:
            raise NotReady(f"{model} {version} was refused (the gateway log says why)")
        if key in self._pending or key in self._examining:
            raise NotReady(f"{model} {version} is not loaded yet")
        if model in self.models():
            raise VersionNotFound(f"model {model!r} has no version {version!r}")
        raise ModelNotFound(f"model {model!r} is not in the registry")

    def default_version(self, model: str) -> str:
        """The highest loaded version whose stage is `production` (cached: hot path)."""
        found = self._defaults.get(model)
        if found is not None:
            return found
        production = [
            v
            for v in self.versions(model)
            if self._loaded[(model, v)].manifest.stage == "production"
        ]
        if not production:
            raise NotReady(f"model {model!r} has no loaded version with stage 'production'")
        self._defaults[model] = production[-1]
        return production[-1]

    def refused(self) -> dict[tuple[str, str], str]:
        """Every version whose current files are refused, and the reason (a stale one,
        still serving its last verified load, too)."""
        return {key: refusal.reason for key, refusal in self._refused.items()}

    def availability(self, model: str, version: str) -> Availability:
        """Whether the version can take traffic (serving/availability.py)."""
        key = (model, version)
        loaded = self._loaded.get(key)
        if loaded is not None:
            if key in self._refused:
                return Availability.STALE
            return Availability.READY if loaded.runner.ready else Availability.UNREADY
        if key in self._refused:
            return Availability.REFUSED
        if key in self._pending or key in self._examining:
            return Availability.LOADING
        return Availability.MISSING
