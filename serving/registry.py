"""The model registry: watches root/<model>/<version>/, loads verified versions, answers lookups.

The directory is polled, not watched with inotify: polling sees Kubernetes-style
atomic symlink swaps and works on network filesystems. Each scan fingerprints every
version directory (name, device, inode, size and mtime of each visible file, symlinks
followed) and looks again only where a fingerprint changed.

A version whose files changed is verified (manifest valid, names match its
directories, artifact sha256 matches) and then loaded. When verification fails, the
version is given one more scan to settle, because a copy may still be in progress;
if it fails again with the same files it is refused: one WARNING line
`refused <model>/<version>: <reason>`, and it stays refused until its files change.
A version that was serving and whose files change to something bad is unloaded and
refused rather than kept serving: the files on disk are the source of truth, and an
old model in memory that no longer matches them would be served by nobody's intent.
While its new files settle (one scan), the old model keeps serving. A changed
version that verifies is loaded beside the old one and swapped in before the old one
is unloaded, so it never stops serving; files that change but keep the same manifest
and sha256 (a touch, a ConfigMap re-sync) cause no reload. `http` versions whose
upstream is not ready are retried on every scan, since nothing on disk will change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rollguard.serving.batching import BatchingRunner
from rollguard.serving.catalog import (
    Fingerprint,
    scan_versions,
    verify_directory,
    version_key,
)
from rollguard.serving.deadlines import Deadline
from rollguard.serving.errors import ModelNotFound, NotReady, ServingError, VersionNotFound
from rollguard.serving.manifest import Manifest
from rollguard.serving.runners import LocalRunner, Runner, create_runner
from rollguard.serving.scheduling import Scheduled

logger = logging.getLogger(__name__)

_Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class LoadedVersion:
    """A verified version whose runner is loaded and serving."""

    manifest: Manifest
    runner: Runner
    directory: Path
    loaded_at: datetime


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: str
    manifest: Manifest | None
    retry: bool  # look again every scan even if the files did not change


@dataclass(frozen=True, slots=True)
class _Outcome:
    """The result of examining one version directory."""

    # Neither `loaded` nor `reason`: same manifest and artifact as the one serving.
    loaded: LoadedVersion | None = None  # a new runner, loaded
    reason: str | None = None  # failure
    final: bool = False  # failure that waiting cannot cure (the files verified)
    manifest: Manifest | None = None
    retry: bool = False


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
        executor: Executor,
        poll_interval: float,
        inline_below_us: float,
        timeout_s: float,
    ) -> None:
        """`executor` runs local models; `inline_below_us` lets cheap ones run on the loop
        (serving/scheduling.py); `timeout_s` bounds each local call (an `http` version's
        own `timeout_s` bounds its calls)."""
        self.root = root
        self.inline_below_us = inline_below_us
        self.poll_interval = poll_interval
        self.timeout_s = timeout_s
        self._executor = executor
        self._loaded: dict[_Key, LoadedVersion] = {}
        self._defaults: dict[str, str] = {}  # model -> default version; cleared on any change
        self._refused: dict[_Key, _Refusal] = {}
        self._pending: dict[_Key, tuple[Fingerprint, str]] = {}  # failed once, settling
        self._settled: dict[_Key, Fingerprint] = {}  # files behind the loaded/refused state
        self._lock = asyncio.Lock()
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
            for key in list(self._loaded):
                await self._loaded.pop(key).runner.unload()
                self._defaults.clear()
            self._refused.clear()
            self._pending.clear()
            self._settled.clear()

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
            todo = [(key, d, fp) for key, (d, fp) in seen.items() if self._needs_look(key, fp)]
            outcomes = await asyncio.gather(*(self._examine(key, d) for key, d, _ in todo))
            for (key, _, fp), outcome in zip(todo, outcomes, strict=True):
                await self._apply(key, fp, outcome)

    def _known(self) -> set[_Key]:
        return self._loaded.keys() | self._refused.keys() | self._pending.keys()

    def _needs_look(self, key: _Key, fingerprint: Fingerprint) -> bool:
        refusal = self._refused.get(key)
        return (
            key in self._pending
            or (refusal is not None and refusal.retry)
            or self._settled.get(key) != fingerprint
        )

    async def _examine(self, key: _Key, directory: Path) -> _Outcome:
        loop = asyncio.get_running_loop()
        try:  # hashing reads the whole artifact: off the event loop, off the model executor
            manifest = await loop.run_in_executor(None, verify_directory, directory, *key)
        except ServingError as exc:
            return _Outcome(reason=str(exc))
        except Exception as exc:  # e.g. the directory changed under us mid-read
            return _Outcome(reason=f"{directory}: {type(exc).__name__}: {exc}")
        current = self._loaded.get(key)
        if current is not None and current.manifest == manifest:
            return _Outcome()
        try:
            runner = self._compose(create_runner(manifest, directory))
            await runner.load()
        except Exception as exc:  # a runner may raise anything its framework raises
            reason = _naming_the_file(str(exc) or type(exc).__name__, directory, manifest)
            return _Outcome(
                reason=reason, final=True, manifest=manifest, retry=manifest.framework == "http"
            )
        return _Outcome(loaded=LoadedVersion(manifest, runner, directory, datetime.now(UTC)))

    def _compose(self, runner: Runner) -> Runner:
        """The framework runner wrapped as the manifest asks: a local one scheduled on the
        executor with its time limit (inline when cheap, never when batched: a batched
        version is one whose calls are worth queueing for), then batched."""
        manifest = runner.manifest
        if isinstance(runner, LocalRunner):
            inline = 0.0 if manifest.batching else self.inline_below_us
            runner = Scheduled(runner, self._executor, inline, self.timeout_s)
        if manifest.batching is not None:
            batched = BatchingRunner(
                runner,
                max_batch_size=manifest.batching.max_batch_size,
                max_delay_ms=manifest.batching.max_delay_ms,
                max_concurrent_batches=manifest.batching.max_concurrent_batches,
            )
            # A remote runner's pool times its calls out (the manifest's timeout_s), a
            # scheduled one its thread calls; a queued caller is bounded here.
            runner = Deadline(batched, self.timeout_s)
        return runner

    async def _apply(self, key: _Key, fingerprint: Fingerprint, outcome: _Outcome) -> None:
        label = "/".join(key)
        if outcome.reason is None:
            self._pending.pop(key, None)
            self._refused.pop(key, None)
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
                    await old.runner.unload()
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
        self._settled[key] = fingerprint
        previous = self._refused.get(key)
        self._refused[key] = _Refusal(outcome.reason, outcome.manifest, outcome.retry)
        old = self._loaded.pop(key, None)
        self._defaults.clear()
        if old is not None:
            logger.warning(
                "refused %s: %s (it was serving; unloaded because its files changed)",
                label, outcome.reason,
            )  # fmt: skip
            await old.runner.unload()
        elif previous is None or previous.reason != outcome.reason:
            logger.warning("refused %s: %s", label, outcome.reason)

    async def _forget(self, key: _Key) -> None:
        self._refused.pop(key, None)
        self._pending.pop(key, None)
        self._settled.pop(key, None)
        old = self._loaded.pop(key, None)
        self._defaults.clear()
        if old is not None:
            logger.info("unloaded %s: its directory is gone", "/".join(key))
            await old.runner.unload()

    # --- queries -----------------------------------------------------------------------

    def models(self) -> list[str]:
        """Every model with at least one version directory, loaded or not."""
        return sorted({model for model, _ in self._known()})

    def versions(self, model: str) -> list[str]:
        """The model's loaded versions, in natural version order."""
        if model not in self.models():
            raise ModelNotFound(f"model {model!r} is not in the registry")
        return sorted((v for m, v in self._loaded if m == model), key=version_key)

    def get(self, model: str, version: str) -> LoadedVersion:
        """A loaded version; ModelNotFound, VersionNotFound, or NotReady saying why not."""
        key = (model, version)
        if key in self._loaded:
            return self._loaded[key]
        if key in self._refused:
            raise NotReady(f"{model} {version} was refused: {self._refused[key].reason}")
        if key in self._pending:
            raise NotReady(f"{model} {version} is not loaded yet: {self._pending[key][1]}")
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
        """Every refused version and the reason."""
        return {key: refusal.reason for key, refusal in self._refused.items()}
