"""Errors tell clients a short reason; paths, hashes and upstream URLs stay in the log.

The real gateway over loopback with a version refused for a hash mismatch (its reason
names the artifact's absolute path and both digests) and an upstream that fails with a
body of its own: neither the answers nor the metrics carry those details.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp import web

from rollguard.serving.demo.build import load_eval_data
from rollguard.serving.hashing import sha256_file
from tests.faults.support import artifact_of, change_bytes, copy_version
from tests.proxy.support import serve, start_upstream, write_remote_version
from tests.serving.support import eventually

X, _ = load_eval_data()
UPSTREAM_SECRET = "stack trace at /srv/models/internal.py line 7"


async def test_refused_versions_and_failing_upstreams_say_no_paths_hashes_or_urls(
    tmp_path: Path, demo_registry: Path
) -> None:
    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def infer(request: web.Request) -> web.Response:
        return web.Response(status=500, text=UPSTREAM_SECRET)

    app = web.Application()
    app.router.add_get("/v2/models/remote/versions/1/ready", ready)
    app.router.add_post("/v2/models/remote/versions/1/infer", infer)
    runner, base = await start_upstream(app)
    endpoint = f"{base}/v2/models/remote/versions/1"
    registry = tmp_path / "registry"
    (registry / "fraud").mkdir(parents=True)
    broken = copy_version(demo_registry, registry, "1.0.0")
    change_bytes(broken)  # refused: its reason names the file and both sha256s
    digest = sha256_file(artifact_of(broken))
    write_remote_version(registry, "1", endpoint)
    secrets = [str(tmp_path), digest, endpoint, base, UPSTREAM_SECRET]
    try:
        async with serve(tmp_path, registry) as server, aiohttp.ClientSession() as http:
            await eventually(lambda: server.running.registry.refused() != {})
            answers = []
            fraud = {"features": X[0].tolist()}
            async with http.post(f"{server.url}/predict/fraud", json=fraud) as r:
                answers.append((r.status, await r.text()))
            pinned = f"{server.url}/v2/models/fraud/versions/1.0.0/infer"
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30],
                                "data": X[0].tolist()}]}  # fmt: skip
            async with http.post(pinned, json=body) as r:
                answers.append((r.status, await r.text()))
            remote = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                  "data": [1, 2]}]}  # fmt: skip
            async with http.post(f"{server.url}/v2/models/remote/infer", json=remote) as r:
                answers.append((r.status, await r.text()))
            async with http.get(f"{server.url}/v2/models/fraud/versions/1.0.0/ready") as r:
                answers.append((r.status, await r.text()))
            async with http.get(f"{server.admin_url}/metrics") as r:
                metrics = await r.text()
    finally:
        await runner.cleanup()
    assert [status for status, _ in answers][:3] == [503, 503, 502], answers
    for status, text in answers:
        assert (text.startswith("{") and '"error"' in text) or status == 200, text
        leaked = [s for s in secrets if s in text]
        assert leaked == [], (status, text, leaked)
    leaked = [s for s in secrets if s in metrics]
    assert leaked == [], leaked
