"""A time limit on every call of a runner whose callers wait in turn (a batching queue).

The caller gets `DeadlineExceeded` at the deadline and its place is given up; work
already started finishes on its own. Calls on threads get their limit where they are
scheduled (serving/scheduling.py), remote calls from their connection pool.
"""

from __future__ import annotations

import asyncio

from rollguard.serving.errors import DeadlineExceeded
from rollguard.serving.messages import InferRequest, InferResponse
from rollguard.serving.runners.base import Runner, Wrapper


class Deadline(Wrapper):
    """`inner`'s answer within `seconds`, else DeadlineExceeded naming the version."""

    def __init__(self, inner: Runner, seconds: float) -> None:
        super().__init__(inner)
        self.seconds = seconds

    async def predict(self, request: InferRequest) -> InferResponse:
        timeout = asyncio.timeout(self.seconds)
        try:
            async with timeout:
                return await self.inner.predict(request)
        except TimeoutError:
            if not timeout.expired():
                raise  # the inner runner's own failure, not our deadline
            manifest = self.manifest
            raise DeadlineExceeded(
                f"{manifest.name}/{manifest.version} did not answer within {self.seconds:g}s"
            ) from None
