"""Start the real gateway application on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.app import create_app
from proxy.gateway import Gateway
from proxy.rollouts import Rollouts
from proxy.settings import Settings
from proxy.state import GATEWAY, ROLLOUTS


@dataclass
class Server:
    url: str
    app: web.Application
    settings: Settings

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    @property
    def rollouts(self) -> Rollouts:
        return self.app[ROLLOUTS]


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, registry: Path, **settings: Any) -> AsyncIterator[Server]:
    """Start the real application on a free loopback port; stop it afterwards."""
    policies = settings.pop("policies", tmp_path / "policies")
    Path(policies).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - test set-up
    config = Settings(
        registry=registry,
        policies=policies,
        state=settings.pop("state", tmp_path / "state"),
        port=0,
        **settings,
    )
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Server(f"http://127.0.0.1:{port}", app, config)
    finally:
        await runner.cleanup()
