"""A naive aiohttp pass-through proxy: the yardstick rollguard's proxy mode must beat by 1.5x.

`python -m load_tests.bench.naive_proxy --upstream http://127.0.0.1:9001 --port 9002`
forwards each POST body unchanged to the same path upstream over one pooled client
session and copies back status, content type and body; what anyone would write first.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

_SESSION = web.AppKey("session", aiohttp.ClientSession)


def make_app(upstream: str) -> web.Application:
    base = upstream.rstrip("/")

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        session = request.app[_SESSION]
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with session.request(
            request.method, base + request.path_qs, data=body, headers=headers
        ) as answer:
            payload = await answer.read()
            return web.Response(
                body=payload, status=answer.status, content_type=answer.content_type
            )

    async def client(app: web.Application) -> AsyncIterator[None]:
        app[_SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
        yield
        await app[_SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(client)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9001")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        make_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
