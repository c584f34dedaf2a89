"""`rollguard serve` with gc.freeze() once started: a diagnostic target, not a product change.

The gateway process tracks ~130,000 objects after start-up (scipy, pydantic, aiohttp,
the registry); each full (generation 2) collection walks them all, ~70 ms on this
machine, every ~1,250 requests under load: the p99 tail. Freezing what exists once the
services are up leaves collections only the objects made since. This module runs the
real CLI with that one call added, so the bench can show the effect beside the real
thing: `python -m load_tests.bench.gc_frozen serve ...` takes `rollguard serve`'s flags.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from aiohttp import web

import proxy.app
from proxy import cli

_create_app = proxy.app.create_app


async def _freeze(app: web.Application) -> None:
    gc.collect()
    gc.freeze()


def _create_frozen(*args: Any, **kwargs: Any) -> web.Application:
    app = _create_app(*args, **kwargs)
    app.on_startup.append(_freeze)  # after the services' start-up: models are loaded
    return app


if __name__ == "__main__":
    proxy.app.create_app = _create_frozen  # cli imports it by name when `serve` runs
    sys.exit(cli.main())
