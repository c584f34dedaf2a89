"""Start the real gateway on free loopback ports, for end-to-end tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from rollguard.proxy.gateway import Gateway
from rollguard.proxy.inference import Inference
from rollguard.proxy.rollouts import Rollouts
from rollguard.proxy.settings import Settings


@dataclass
class Server:
    url: str  # the data port
    admin_url: str  # the admin port: /admin/..., /metrics
    running: Gateway
    settings: Settings

    @property
    def admin_headers(self) -> dict[str, str]:
        """The Authorization header admin wants, or none when started with admin_auth none."""
        token = self.settings.admin_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def grpc_target(self) -> str:
        """host:port of the gRPC port, as gRPC clients take it."""
        return f"127.0.0.1:{self.running.grpc_port}"

    @property
    def gateway(self) -> Inference:
        return self.running.inference

    @property
    def rollouts(self) -> Rollouts:
        return self.running.rollouts


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, registry: Path, **settings: Any) -> AsyncIterator[Server]:
    """Start the real gateway on free loopback ports, as `rollguard serve` does; stop it
    afterwards. `settings` override Settings fields. Admin runs without a token
    (`admin_auth: none`, loopback only) unless the test passes `admin_token`."""
    if "admin_token" not in settings:
        settings.setdefault("admin_auth", "none")
    policies = settings.pop("policies", tmp_path / "policies")
    Path(policies).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - test set-up
    config = Settings(
        registry=registry,
        policies=policies,
        state=settings.pop("state", tmp_path / "state"),
        port=0,
        admin_port=0,
        grpc_port=settings.pop("grpc_port", 0),
        **settings,
    )
    gateway = Gateway(config)
    await gateway.start()
    try:
        yield Server(
            f"http://127.0.0.1:{gateway.port}",
            f"http://127.0.0.1:{gateway.admin_port}",
            gateway,
            config,
        )
    finally:
        await gateway.close()


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


async def start_upstream(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve a stand-in V2 upstream on a free loopback port: (its runner, its base URL)."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"
