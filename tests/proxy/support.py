"""Start the real gateway application on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from rollguard.proxy.app import create_app
from rollguard.proxy.inference import Inference
from rollguard.proxy.rollouts import Rollouts
from rollguard.proxy.server import start_server
from rollguard.proxy.settings import Settings
from rollguard.proxy.state import GATEWAY, ROLLOUTS


@dataclass
class Server:
    url: str
    app: web.Application
    settings: Settings

    @property
    def gateway(self) -> Inference:
        return self.app[GATEWAY]

    @property
    def rollouts(self) -> Rollouts:
        return self.app[ROLLOUTS]


@contextlib.asynccontextmanager
async def serve(
    tmp_path: Path,
    registry: Path,
    server_options: Mapping[str, Any] | None = None,
    **settings: Any,
) -> AsyncIterator[Server]:
    """Start the real application on a free loopback port, as `rollguard serve` does (the
    fast infer path in front of aiohttp); stop it afterwards. `server_options` go to
    `start_server` (keepalive_s, grace_s)."""
    server_options = server_options or {}
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
    served = await start_server(app, "127.0.0.1", 0, **server_options)
    try:
        yield Server(f"http://127.0.0.1:{served.port}", app, config)
    finally:
        await served.close()


def write_remote_version(registry: Path, version: str, endpoint: str, outputs: str = "") -> None:
    """registry/remote/<version>: a `framework: http` version taking x FP32 [-1, 2];
    `outputs` is the manifest's outputs list as YAML flow text (none declared if empty)."""
    directory = registry / "remote" / version
    directory.mkdir(parents=True)
    (directory / "model.yaml").write_text(
        f"name: remote\nversion: '{version}'\nframework: http\nendpoint: {endpoint}\n"
        "stage: production\ninputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\n"
        + (f"outputs: {outputs}\n" if outputs else "")
    )
