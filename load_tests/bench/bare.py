"""The floor for any Python gateway: one process of aiohttp + uvloop + orjson + onnxruntime.

`python -m load_tests.bench.bare --model model.onnx --name fraud-onnx --port 9001`
serves a V2 infer endpoint with no routing, no metrics, no executor: the model runs on
the event loop thread. `--threads N` runs it on an N-thread executor instead, as
rollguard does (a diagnostic: what the hand-off alone costs). `--delay-ms` makes it a
slow upstream (the shadow benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import uvloop
from aiohttp import web

_V2_DTYPE = {"int64": "INT64", "float32": "FP32", "float64": "FP64", "int32": "INT32"}


def make_app(
    model: str, name: str, version: str = "1", delay_s: float = 0.0, threads: int = 0
) -> web.Application:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_names = [o.name for o in session.get_outputs()]
    executor = ThreadPoolExecutor(threads) if threads else None
    answered = [0]  # infer requests answered 200: what a mirror sent here (GET /count)

    async def infer(request: web.Request) -> web.Response:
        try:
            doc = orjson.loads(await request.read())
            tensor = doc["inputs"][0]
            x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
            error = orjson.dumps({"error": f"bad request: {exc}"})
            return web.Response(body=error, status=400, content_type="application/json")
        if delay_s:
            await asyncio.sleep(delay_s)
        if executor is None:
            results = session.run(output_names, {input_name: x})
        else:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(
                executor, session.run, output_names, {input_name: x}
            )
        outputs: list[dict[str, Any]] = [
            {
                "name": n,
                "datatype": _V2_DTYPE[str(a.dtype)],
                "shape": list(a.shape),
                "data": a.ravel(),
            }
            for n, a in zip(output_names, results, strict=True)
        ]
        answer: dict[str, Any] = {"model_name": name, "model_version": version, "outputs": outputs}
        if "id" in doc:
            answer["id"] = doc["id"]
        body = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
        answered[0] += 1
        return web.Response(body=body, content_type="application/json")

    async def ok(request: web.Request) -> web.Response:
        return web.Response()

    async def count(request: web.Request) -> web.Response:
        return web.Response(text=str(answered[0]))

    app = web.Application()
    app.router.add_post(f"/v2/models/{name}/infer", infer)
    app.router.add_get(f"/v2/models/{name}/ready", ok)
    app.router.add_get("/v2/health/ready", ok)
    app.router.add_get("/v2/health/live", ok)
    app.router.add_get("/count", count)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="path of the .onnx file")
    parser.add_argument("--name", default="fraud-onnx", help="V2 model name")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=0, help="model on an executor")
    args = parser.parse_args()
    app = make_app(args.model, args.name, delay_s=args.delay_ms / 1000, threads=args.threads)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
