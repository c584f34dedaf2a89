"""What every remote runner shares: an upstream followed after load (serving/health.py).

A remote version is ready while its upstream's ready probes pass and its calls have not
ejected it. `RemoteRunner` runs the probe loop and keeps the health record; a subclass
says how to connect (`_open`, `_close`), how to probe (`_probe_ready`) and how to call,
reporting each call's outcome with `_answered` / `_failed`. HTTP (runners/http.py) and
gRPC (runners/grpc.py) upstreams are its two kinds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import abstractmethod
from pathlib import Path

from rollguard.serving.errors import ArtifactError, UpstreamError
from rollguard.serving.health import UpstreamHealth
from rollguard.serving.manifest import Manifest, UpstreamOptions
from rollguard.serving.runners.base import Runner

log = logging.getLogger("rollguard")


class RemoteRunner(Runner):
    """A version another server answers, probed while loaded and ejected when its calls
    keep failing."""

    def __init__(self, manifest: Manifest, directory: Path) -> None:
        super().__init__(manifest, directory)
        options = self._options = manifest.upstream or UpstreamOptions()
        self.health = UpstreamHealth(
            unready_after=options.unready_after,
            eject_after=options.eject_after,
            eject_base_s=options.eject_base_s,
            eject_max_s=options.eject_max_s,
        )
        self._what = f"{manifest.name} {manifest.version}"
        self._watcher: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """Loaded, its ready probes passing and not ejected for failing calls."""
        return self._ready and self.health.ok

    @property
    def probed_ready(self) -> bool:
        return self._ready and self.health.probe_ok

    @abstractmethod
    def _open(self) -> None:
        """Make the connection pool or channel (again, after an unload)."""

    @abstractmethod
    def _is_open(self) -> bool:
        """Whether `_open` has made what `_close` would close."""

    @abstractmethod
    async def _close(self) -> None:
        """Close what `_open` made; calls still running fail."""

    @abstractmethod
    async def _probe_ready(self) -> None:
        """Ask the upstream whether the model is ready; ArtifactError saying why not."""

    async def load(self) -> None:
        if not self._is_open():
            self._open()
        try:
            await self._probe_ready()
        except BaseException:  # refused or cancelled: the caller may drop us without unload
            await self.unload()
            raise
        self._ready = True
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(), name=f"rollguard-probe-{self._what}"
        )

    async def _watch(self) -> None:
        """Probe the upstream every `probe_interval_s` while loaded."""
        while True:
            await asyncio.sleep(self._options.probe_interval_s)
            try:
                await self._probe_ready()
            except ArtifactError as exc:
                if self.health.probed(False):
                    log.warning("%s: upstream unready, no traffic until it recovers: %s",
                                self._what, exc)  # fmt: skip
            else:
                if self.health.probed(True):
                    log.info("%s: upstream ready again", self._what)

    def _answered(self) -> None:
        """A call was answered (or refused as the client's fault: the upstream is fine)."""
        self.health.answered()

    def _failed(self, failure: UpstreamError) -> None:
        """A call failed as the upstream's fault (5xx, reset, timeout, nonsense); the
        failure remembers its place in the health record (see `excuse_failure`)."""
        ejected = self.health.failed()
        failure.health_serial = self.health.serial
        if ejected is not None:
            log.warning("%s: %d upstream failures in a row, ejected for %g s",
                        self._what, self.health.eject_after, ejected)  # fmt: skip

    def excuse_failure(self, failure: Exception) -> None:
        serial = getattr(failure, "health_serial", None)
        if serial is not None:
            self.health.excused(serial)

    async def unload(self) -> None:
        self._ready = False
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self._close()
