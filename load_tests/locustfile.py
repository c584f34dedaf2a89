"""A Locust user for rollguard: V2 infer on `fraud` with a sticky x-user-id, and labels later.

Locust is not a rollguard dependency (load_tests/loadgen.py is the open-loop generator
the scenarios use); to drive a running gateway with it:

    pip install locust
    locust -f load_tests/locustfile.py --host http://127.0.0.1:8080

Each simulated user keeps one x-user-id, so a hash split pins it to one variant, and
now and then posts the true labels of its earlier answers to the feedback endpoint, as
delayed ground truth arrives in production.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

from locust import HttpUser, between, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # locust runs from anywhere

from rollguard.serving.demo.build import load_eval_data

MODEL = "fraud"
_ROWS, _LABELS = load_eval_data()
BODIES: list[dict[str, Any]] = [
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": row.tolist()}]}
    for row in _ROWS
]
LABELS = [int(y) for y in _LABELS]
MAX_PENDING = 100  # labels a user remembers before it must send some


class FraudUser(HttpUser):  # type: ignore[misc]  # locust ships no type hints
    """One end user: scores transactions, sometimes reports what they turned out to be."""

    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.user_id = f"locust-{random.getrandbits(32):08x}"
        self.pending: list[dict[str, Any]] = []

    @task(10)  # type: ignore[untyped-decorator]
    def infer(self) -> None:
        row = random.randrange(len(BODIES))
        with self.client.post(
            f"/v2/models/{MODEL}/infer",
            json=BODIES[row],
            headers={"x-user-id": self.user_id},
            name=f"/v2/models/{MODEL}/infer",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                # 503 (overloaded) carries Retry-After; either way it is a failed request.
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            response.success()
            request_id = response.headers.get("x-request-id")
            if request_id and len(self.pending) < MAX_PENDING:
                self.pending.append({"id": request_id, "label": LABELS[row]})

    @task(1)  # type: ignore[untyped-decorator]
    def feedback(self) -> None:
        """Send the labels gathered since the last time, in one list body."""
        if not self.pending:
            return
        labels, self.pending = self.pending, []
        self.client.post(
            f"/v2/models/{MODEL}/feedback", json=labels, name=f"/v2/models/{MODEL}/feedback"
        )
