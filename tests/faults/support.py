"""What the isolation and output tests share: V2 bodies, the admin API, /metrics, polling."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.proxy.support import Server


def v2_body(rows: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "data": rows.ravel().tolist(),
            }
        ]
    }


async def admin(server: Server, http: aiohttp.ClientSession, path: str) -> Any:
    async with http.get(f"{server.admin_url}/admin/{path}", headers=server.admin_headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def metric(server: Server, http: aiohttp.ClientSession, name: str) -> dict[str, float]:
    """Every sample of a metric, by its labels rendered `k=v,...` (sorted)."""
    async with http.get(f"{server.admin_url}/metrics", headers=server.admin_headers) as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))] = sample.value
    return out


async def requests_by_code(
    server: Server, http: aiohttp.ClientSession, model: str, version: str
) -> dict[str, float]:
    """rollguard_requests_total of one version, by code (every role summed)."""
    found: dict[str, float] = {}
    for labels, value in (await metric(server, http, "rollguard_requests_total")).items():
        parts = dict(part.split("=", 1) for part in labels.split(","))
        if parts["model"] == model and parts["version"] == version:
            found[parts["code"]] = found.get(parts["code"], 0.0) + value
    return found


async def until(check: Callable[[], Awaitable[Any]], timeout_s: float = 20.0) -> Any:
    """Await `check()` until it returns something truthy; that value (TimeoutError past
    `timeout_s`)."""
    async with asyncio.timeout(timeout_s):
        while not (found := await check()):  # noqa: ASYNC110 - polling the admin API
            await asyncio.sleep(0.02)
        return found


@dataclass
class Tally:
    """Statuses and answering versions of a stream of requests, and each one's latency."""

    statuses: dict[int, int] = field(default_factory=dict)
    by_variant: dict[str, dict[int, int]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, status: int, variant: str, latency: float, text: str = "") -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        codes = self.by_variant.setdefault(variant, {})
        codes[status] = codes.get(status, 0) + 1
        self.latencies.append(latency)
        if status != 200:
            self.errors.append(f"{status} {variant} {text[:200]}")

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def of(self, variant: str, status: int | None = None) -> int:
        codes = self.by_variant.get(variant, {})
        return sum(codes.values()) if status is None else codes.get(status, 0)


async def post(
    http: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    tally: Tally,
    headers: dict[str, str] | None = None,
) -> int:
    """POST `body`, adding its status, variant and latency to `tally`; the status."""
    start = time.perf_counter()
    async with http.post(url, json=body, headers=headers) as r:
        text = await r.text()
        tally.add(
            r.status, r.headers.get("x-rollguard-variant", "?"), time.perf_counter() - start, text
        )
        return r.status


async def get(http: aiohttp.ClientSession, url: str, tally: Tally) -> int:
    """GET `url`, adding its status and latency to `tally` (variant "-"); the status."""
    start = time.perf_counter()
    async with http.get(url) as r:
        text = await r.text()
        tally.add(r.status, "-", time.perf_counter() - start, text)
        return r.status


# --- registry files broken the ways operators break them ---------------------------


def copy_version(demo: Path, registry: Path, version: str) -> Path:
    """A real copy (not a link: the test breaks its files) of a demo fraud version,
    moved into place in one rename as a careful operator would."""
    target = registry / "fraud" / version
    staging = registry / f".staging-{version}"
    shutil.copytree(demo / "fraud" / version, staging, symlinks=False)
    staging.rename(target)
    return target


def artifact_of(directory: Path) -> Path:
    return next(p for p in directory.iterdir() if p.suffix in (".skops", ".joblib"))


def change_bytes(directory: Path) -> None:
    artifact = artifact_of(directory)
    artifact.write_bytes(artifact.read_bytes() + b"\0")  # sha256 no longer matches


def delete_artifact(directory: Path) -> None:
    artifact_of(directory).unlink()


def corrupt_manifest(directory: Path) -> None:
    (directory / "model.yaml").write_text("name: [unclosed\n")
