"""A Locust user for rollguard: V2 infer on your model with a sticky key, and labels later.

Locust is a dev dependency only (load_tests/loadgen.py is the open-loop generator the
scenarios use). To drive a running gateway with your own model and inputs:

    locust -f load_tests/locustfile.py --host http://127.0.0.1:8080 \
        --model fraud --inputs rows.jsonl --key header:x-user-id

Every option also comes from the environment (ROLLGUARD_LOAD_MODEL, ROLLGUARD_LOAD_INPUTS,
ROLLGUARD_LOAD_INPUT_NAME, ROLLGUARD_LOAD_KEY); without them the demo model `fraud` and
its evaluation rows are used. Input formats are in load_tests/inputs.py.

Each simulated user keeps one key, so a hash split pins it to one variant: with a few
users, a 10 % candidate may get none of them. That is the split working, not a sample-ratio
mismatch; run enough users (-u) for the split to show, or `--key none` for a per-request
split. When the inputs carry labels, each user now and then posts the true labels of its
earlier answers to the feedback endpoint, as delayed ground truth arrives in production.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # locust runs from anywhere

from load_tests.inputs import DEFAULT_KEY, DEFAULT_MODEL, ENV, Inputs, Target, target_from

MAX_PENDING = 100  # labels a user remembers before it must send some
_LOADED: dict[int, tuple[Target, Inputs]] = {}  # per Locust environment


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: Any) -> None:
    group = parser.add_argument_group("rollguard")
    group.add_argument(
        "--model", env_var=ENV["model"], default=DEFAULT_MODEL,
        help="the model to infer on (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--inputs", env_var=ENV["inputs"], default="",
        help="inputs file: .jsonl/.json V2 bodies (optional 'label'), .npy, .npz (x, y) "
        "or .csv (a 'label' column); default: the demo's rows",
    )  # fmt: skip
    group.add_argument(
        "--input-name", env_var=ENV["input_name"], default="input",
        help="tensor name for .npy/.npz/.csv rows (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--key", env_var=ENV["key"], default=DEFAULT_KEY,
        help="stickiness key: header:NAME, cookie:NAME or none (default: %(default)s)",
    )  # fmt: skip


def _loaded(environment: Any) -> tuple[Target, Inputs]:
    """The target and its inputs, read once per Locust environment."""
    found = _LOADED.get(id(environment))
    if found is None:
        options = environment.parsed_options
        target = target_from(None if options is None else vars(options))
        found = _LOADED[id(environment)] = (target, target.read())
    return found


class ModelUser(HttpUser):
    """One end user: sends requests, sometimes reports what they turned out to be."""

    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.target, self.inputs = _loaded(self.environment)
        self.user_id = f"locust-{random.getrandbits(32):08x}"
        self.pending: list[dict[str, Any]] = []

    @task(10)
    def infer(self) -> None:
        row = random.randrange(len(self.inputs.bodies))
        model = self.target.model
        headers = {"Content-Type": "application/json", **self.target.headers(self.user_id)}
        with self.client.post(
            f"/v2/models/{model}/infer",
            data=self.inputs.bodies[row],
            headers=headers,
            name=f"/v2/models/{model}/infer",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                # 503 (overloaded) carries Retry-After; either way it is a failed request.
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            response.success()
            request_id = response.headers.get("x-request-id")
            labels = self.inputs.labels
            if labels is not None and request_id and len(self.pending) < MAX_PENDING:
                self.pending.append({"id": request_id, "label": labels[row]})

    @task(1)
    def feedback(self) -> None:
        """Send the labels gathered since the last time, in one list body."""
        if not self.pending:
            return
        labels, self.pending = self.pending, []
        model = self.target.model
        self.client.post(
            f"/v2/models/{model}/feedback", json=labels, name=f"/v2/models/{model}/feedback"
        )
