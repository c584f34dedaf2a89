"""Suite-wide pytest setup: async tests run on uvloop, as the gateway does."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import uvloop

# A `rollguard serve` a test starts takes any free gRPC port, never the default 8082 that
# another gateway (another test, another run on the machine) may hold.
os.environ.setdefault("ROLLGUARD_GRPC_PORT", "0")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}
