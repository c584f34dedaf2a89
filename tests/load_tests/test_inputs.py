"""The load tests take the user's model, inputs file and stickiness key (load_tests/inputs.py):
each inputs format read, bad files named by line, options over the environment over the
defaults, scenarios resolving their inputs, and Locust driving a real gateway with a
user's own model, requests and cookie key (a smoke run, loopback only)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from load_tests.inputs import InputsError, Target, parse_key, read_inputs, target_from
from load_tests.run_scenario import _workload, with_target
from load_tests.scenario import ScenarioError, load_scenario
from rollguard.proxy.routing import KeySource
from tests.proxy.mlserver_standin import MLServerStandIn, write_version
from tests.proxy.support import serve, start_upstream

REPO = Path(__file__).resolve().parents[2]
X, Y = load_breast_cancer(return_X_y=True)
SCENARIO = """\
name: mine
models: [fraud/1.0.0]
target: {model: mine, users: 20, key: "cookie:uid", inputs: rows.jsonl}
load: {phases: [{rate: 5, duration: 1s}]}
feedback: {enabled: true}
"""


def _v2(row: list[float], name: str = "input-0") -> dict[str, object]:
    return {"inputs": [{"name": name, "datatype": "FP64", "shape": [1, len(row)], "data": row}]}


def _jsonl(path: Path, n: int, labels: bool = True) -> Path:
    lines = [_v2(X[i].tolist()) | ({"label": int(Y[i])} if labels else {}) for i in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_each_inputs_format_gives_bodies_and_labels(tmp_path: Path) -> None:
    found = read_inputs(_jsonl(tmp_path / "rows.jsonl", 3))
    assert found.labels == [int(v) for v in Y[:3]]
    assert json.loads(found.bodies[0]) == _v2(X[0].tolist())  # sent as given, label taken out

    (tmp_path / "rows.json").write_text(json.dumps([_v2([1.0, 2.0]), _v2([3.0, 4.0])]))
    assert read_inputs(tmp_path / "rows.json").labels is None

    np.save(tmp_path / "rows.npy", np.arange(6, dtype=np.float64).reshape(3, 2))
    npy = read_inputs(tmp_path / "rows.npy", "features")
    doc = json.loads(npy.bodies[2])["inputs"][0]
    assert doc == {"name": "features", "datatype": "FP32", "shape": [1, 2], "data": [4.0, 5.0]}

    np.savez(tmp_path / "rows.npz", x=np.ones((4, 3)), y=np.array([0, 1, 1, 0]))
    npz = read_inputs(tmp_path / "rows.npz")
    assert len(npz.bodies) == 4 and npz.labels == [0, 1, 1, 0]

    (tmp_path / "rows.csv").write_text("a,label,b\n1.5,1,2\n3,0,4.25\n")
    csv = read_inputs(tmp_path / "rows.csv")
    assert csv.labels == [1, 0]
    assert json.loads(csv.bodies[1])["inputs"][0]["data"] == [3.0, 4.25]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("rows.jsonl", '{"inputs": []}\n{not json\n', r"rows.jsonl:2: not valid JSON"),
        ("rows.jsonl", '{"inputs": [], "label": 1}\n{"inputs": []}\n', r"rows.jsonl:2: has no"),
        ("rows.jsonl", '{"instances": [1]}\n', r"rows.jsonl:1: expected a V2 infer body"),
        ("rows.jsonl", "\n", r"holds no requests"),
        ("rows.json", '{"inputs": []}', r"expected a JSON list"),
        ("rows.csv", "a,b\n1,x\n", r"rows.csv:2: every column must be a number"),
        ("rows.csv", "a,b\n1\n", r"rows.csv:2: 1 columns, the header has 2"),
        ("rows.txt", "1 2 3", r"unknown inputs format '.txt'"),
    ],
)
def test_a_bad_inputs_file_is_named_with_its_line(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputsError, match=message):
        read_inputs(path)


def test_a_missing_inputs_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(InputsError, match="cannot read"):
        read_inputs(tmp_path / "nowhere.jsonl")


def test_options_win_over_the_environment_over_the_defaults() -> None:
    assert target_from({}, {}) == Target()
    environ = {"ROLLGUARD_LOAD_MODEL": "credit", "ROLLGUARD_LOAD_KEY": "cookie:session"}
    from_env = target_from({}, environ)
    assert from_env.model == "credit" and from_env.key == KeySource("cookie", "session")
    given = target_from({"model": "churn", "key": "none", "inputs": "r.npy"}, environ)
    assert (given.model, given.key, given.inputs) == ("churn", None, Path("r.npy"))
    assert Target(key=KeySource("cookie", "uid")).headers("u1") == {"Cookie": "uid=u1"}
    assert Target(key=None).headers("u1") == {}
    with pytest.raises(InputsError, match="header:NAME"):
        parse_key("x-user-id")


def test_a_scenario_takes_its_inputs_relative_to_its_file_and_options_override(
    tmp_path: Path,
) -> None:
    _jsonl(tmp_path / "rows.jsonl", 5)
    (tmp_path / "mine.yaml").write_text(SCENARIO)
    scenario = load_scenario(tmp_path / "mine.yaml")
    assert scenario.target.inputs == tmp_path / "rows.jsonl"
    workload = _workload(scenario, "http://127.0.0.1:1")
    assert workload.url == "http://127.0.0.1:1/v2/models/mine/infer"
    assert (workload.user_cookie, workload.users, len(workload.bodies)) == ("uid", 20, 5)
    assert workload.feedback_url == "http://127.0.0.1:1/v2/models/mine/feedback"

    options = {"model": "other", "key": "header:x-tenant"}
    overridden = _workload(with_target(scenario, options, {}), "http://127.0.0.1:1")
    assert overridden.url.endswith("/v2/models/other/infer")
    assert (overridden.user_cookie, overridden.user_header) == (None, "x-tenant")
    no_key = _workload(with_target(scenario, {}, {"ROLLGUARD_LOAD_KEY": "none"}), "http://x:1")
    assert no_key.users == 0

    (tmp_path / "bad.yaml").write_text(SCENARIO.replace("cookie:uid", "uid"))
    with pytest.raises(ScenarioError, match=r"target.key"):
        load_scenario(tmp_path / "bad.yaml")


CANARY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: bc}
spec:
  model: bc
  stable: "1"
  candidate: "2"
  key: cookie:uid
  interval: 1h
  steps: [{weight: 50, hold: 1h}, {weight: 100}]
"""


@pytest.fixture
async def standin() -> AsyncIterator[tuple[MLServerStandIn, str]]:
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, Y)
    server = MLServerStandIn("bc", {"1": model, "2": model})
    runner, base = await start_upstream(server.application())
    try:
        yield server, base
    finally:
        await runner.cleanup()


LOCUST = Path(sys.executable).parent / "locust"
needs_locust = pytest.mark.skipif(
    not LOCUST.exists(), reason="locust is not installed (pip install -e '.[dev]')"
)


async def _locust(url: str, users: int, seconds: int, environ: dict[str, str], *args: str) -> str:
    """Run the locustfile headless against `url`; its output (exit status 0 asserted)."""
    process = await asyncio.create_subprocess_exec(
        str(LOCUST), "-f", str(REPO / "load_tests" / "locustfile.py"), "--headless",
        "--host", url, "-u", str(users), "-r", str(users), "-t", f"{seconds}s",
        "--only-summary", "--exit-code-on-error", "1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={"PATH": str(LOCUST.parent), **environ},
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-3000:]
    return text


def _bc_registry(tmp_path: Path, upstream: MLServerStandIn, base: str, policy: str) -> Path:
    registry = tmp_path / "registry"
    write_version(registry, "1", upstream.url(base, "1"))
    write_version(registry, "2", upstream.url(base, "2"), stage="staging")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "bc.yaml").write_text(policy)
    return registry


@needs_locust
async def test_locust_drives_a_gateway_with_the_users_model_inputs_and_cookie_key(
    tmp_path: Path, standin: tuple[MLServerStandIn, str]
) -> None:
    """Not the demo: model `bc` behind an upstream, requests from a .jsonl file, the
    stickiness key in a cookie, all from ROLLGUARD_LOAD_* and options."""
    upstream, base = standin
    registry = _bc_registry(tmp_path, upstream, base, CANARY)
    rows = _jsonl(tmp_path / "rows.jsonl", 40)
    environ = {"ROLLGUARD_LOAD_MODEL": "bc", "ROLLGUARD_LOAD_INPUTS": str(rows)}
    async with serve(tmp_path, registry, policies=tmp_path / "policies") as server:
        text = await _locust(server.url, 12, 4, environ, "--key", "cookie:uid")
    infer = [s for s in upstream.seen if s.doc is not None]
    assert len(infer) >= 10, text[-2000:]
    sent = {orjson.dumps(s.doc["inputs"][0]["data"]) for s in infer if s.doc is not None}
    ours = {orjson.dumps(X[i].tolist()) for i in range(40)}
    assert sent <= ours  # every request came from the file
    assert {s.version for s in infer} == {"1", "2"}  # twelve users split by their cookies
    assert "/v2/models/bc/infer" in text


@needs_locust
async def test_a_few_sticky_locust_users_are_not_a_sample_ratio_mismatch(
    tmp_path: Path, standin: tuple[MLServerStandIn, str]
) -> None:
    """Issue 18's case: Locust's usual few users, each pinned to a variant by its key, at a
    10 % candidate. The split is by key, so the srm check counts keys (three), not the
    requests they send (dozens each): too few units to judge, never a mismatch."""
    upstream, base = standin
    policy = CANARY.replace("weight: 50", "weight: 10").replace(
        "steps:", "checks: [{metric: srm, on_fail: rollback}]\n  steps:"
    )
    registry = _bc_registry(tmp_path, upstream, base, policy)
    environ = {"ROLLGUARD_LOAD_MODEL": "bc", "ROLLGUARD_LOAD_INPUTS": str(
        _jsonl(tmp_path / "rows.jsonl", 40))}  # fmt: skip
    async with serve(tmp_path, registry, policies=tmp_path / "policies") as server:
        await _locust(server.url, 3, 4, environ, "--key", "cookie:uid")
        decision = server.rollouts.tick("bc")
        phase = server.rollouts.describe("bc")["phase"]
    [srm] = [c for c in decision["checks"] if c["metric"] == "srm"]
    detail = srm["detail"]
    assert detail["unit"] == "first-seen keys", detail
    assert detail["units_stable"] + detail["units_candidate"] == 3
    assert detail["routed_stable"] + detail["routed_candidate"] >= 30
    assert srm["verdict"] != "fail", detail
    assert phase == "progressing"
