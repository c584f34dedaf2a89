"""Real models that fail on purpose, trained on scikit-learn's breast-cancer data and
written into a registry the way an operator would (artifact, sha256, model.yaml, one
rename into place).

- `hanging`: the demo's own SlowClassifier with a delay of a minute: a local model that
  hangs (it waits, as one blocked on a lock or a dead connection does, without burning
  the CPU the rest of the test needs).
- `with_loop`: the fraud logistic regression converted to ONNX plus a `Loop` whose trip
  count is the first feature of the first row: microseconds for real rows (mean radius
  7 to 28), seconds for a row whose first feature is a million.
- `wrong_rows` / `wrong_width`: that ONNX model edited to answer twice the rows asked
  for, or a third probability column its manifest does not declare.
- `rounded_root`: a linear regression on the target squared, answered as rint(sqrt(·)):
  its prediction is NaN on every row it predicts below zero, and it is declared an INT64
  label.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.compose import TransformedTargetRegressor
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from rollguard.serving.demo.faulty import SlowClassifier
from rollguard.serving.hashing import sha256_file
from rollguard.serving.manifest import MANIFEST_NAME, dump_manifest, parse_manifest

FEATURES = 30
INPUTS = [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}]
OUTPUTS = [
    {"name": "label", "datatype": "INT64", "shape": [-1]},
    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
]
HANG_S = 60.0  # a hung call's thread returns after this: long past any test, then quiet


@cache
def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test) of a stratified split, float32 features."""
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=0.25, random_state=0, stratify=y
    )
    return x_train, y_train, x_test


def rows() -> np.ndarray:
    """Held-out rows (float32), the requests' features."""
    return _data()[2]


def logistic() -> Pipeline:
    x, y, _ = _data()
    model: Pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=1000))
    return model.fit(x, y)


def hanging(delay_s: float = HANG_S) -> SlowClassifier:
    """A classifier that waits `delay_s` in each predict and predict_proba."""
    x, y, _ = _data()
    inner = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=1000))
    return SlowClassifier(inner, delay_s=delay_s).fit(x, y)


def _rint_root(y: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # the root of a negative prediction is NaN
        rounded: np.ndarray = np.rint(np.sqrt(y))
    return rounded


def rounded_root() -> TransformedTargetRegressor:
    x, y, _ = _data()
    model = TransformedTargetRegressor(
        regressor=make_pipeline(StandardScaler(), LinearRegression()),
        func=np.square,
        inverse_func=_rint_root,
    )
    return model.fit(x, y.astype(np.float64))


def joblib_bytes(model: Any) -> bytes:
    import joblib

    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    return buffer.getvalue()


def onnx_model(model: Any) -> Any:
    """`model` converted by skl2onnx, its outputs named label and probabilities."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    proto = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, FEATURES]))],
        options={id(model): {"zipmap": False}},
        target_opset=17,
    )
    for output, new in zip(proto.graph.output, ["label", "probabilities"], strict=True):
        old, output.name = output.name, new
        for node in proto.graph.node:
            node.output[:] = [new if o == old else o for o in node.output]
    return proto


def _rename_output(proto: Any, name: str, new: str) -> None:
    """The node that made graph output `name` now makes `new` (the output keeps its name,
    for a node added after to make)."""
    for node in proto.graph.node:
        node.output[:] = [new if o == name else o for o in node.output]


def with_loop(proto: Any) -> Any:
    """`proto` whose probabilities also wait for a Loop of int(input[0, 0]) iterations
    (each adds one to a counter, which is multiplied by 0 and added in)."""
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["count_in", "body_one"], ["count_out"]),
        ],
        "count",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("count_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("count_out", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor("body_one", TensorProto.FLOAT, [], [1.0])],
    )
    _rename_output(proto, "probabilities", "probabilities_model")
    graph = proto.graph
    graph.initializer.extend(
        [
            helper.make_tensor("loop_start", TensorProto.INT64, [2], [0, 0]),
            helper.make_tensor("loop_end", TensorProto.INT64, [2], [1, 1]),
            helper.make_tensor("loop_axes", TensorProto.INT64, [2], [0, 1]),
            helper.make_tensor("loop_scalar", TensorProto.INT64, [0], []),
            helper.make_tensor("loop_true", TensorProto.BOOL, [], [True]),
            helper.make_tensor("loop_zero", TensorProto.FLOAT, [], [0.0]),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Slice", ["input", "loop_start", "loop_end", "loop_axes"], ["first"]),
            helper.make_node("Reshape", ["first", "loop_scalar"], ["first_value"]),
            helper.make_node("Cast", ["first_value"], ["trips"], to=TensorProto.INT64),
            helper.make_node("Loop", ["trips", "loop_true", "loop_zero"], ["count"], body=body),
            helper.make_node("Mul", ["count", "loop_zero"], ["nothing"]),
            helper.make_node("Add", ["probabilities_model", "nothing"], ["probabilities"]),
        ]
    )
    return proto


def seconds_per_trip(data: bytes) -> float:
    """What one iteration of `with_loop`'s Loop costs here (ONNX Runtime, one thread):
    the fastest of three calls of 100,000 iterations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    row = rows()[:1].copy()
    row[0, 0] = 100_000
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        session.run(None, {"input": row})
        best = min(best, time.perf_counter() - start)
    return best / 100_000


def wrong_rows(proto: Any) -> Any:
    """`proto` answering each label twice: 2n labels for n rows."""
    from onnx import helper

    _rename_output(proto, "label", "label_model")
    proto.graph.node.append(
        helper.make_node("Concat", ["label_model", "label_model"], ["label"], axis=0)
    )
    return proto


def wrong_width(proto: Any) -> Any:
    """`proto` answering a third probability column: [n, 3] where [-1, 2] is declared."""
    from onnx import TensorProto, helper

    _rename_output(proto, "probabilities", "probabilities_model")
    graph = proto.graph
    graph.initializer.extend(
        [
            helper.make_tensor("extra_start", TensorProto.INT64, [1], [0]),
            helper.make_tensor("extra_end", TensorProto.INT64, [1], [1]),
            helper.make_tensor("extra_axis", TensorProto.INT64, [1], [1]),
        ]
    )
    graph.node.extend(
        [
            helper.make_node(
                "Slice",
                ["probabilities_model", "extra_start", "extra_end", "extra_axis"],
                ["extra"],
            ),
            helper.make_node("Concat", ["probabilities_model", "extra"], ["probabilities"], axis=1),
        ]
    )
    # The graph's declared output shape says 2 columns; ONNX Runtime trusts the nodes.
    for output in graph.output:
        if output.name == "probabilities":
            output.type.tensor_type.shape.dim[1].dim_value = 3
    return proto


def onnx_bytes(proto: Any) -> bytes:
    import onnx

    onnx.checker.check_model(proto)
    data: bytes = proto.SerializeToString()
    return data


def write_version(
    root: Path,
    model: str,
    version: str,
    artifact: str,
    data: bytes,
    *,
    stage: str = "production",
    outputs: list[dict[str, Any]] | None = None,
    runtime: dict[str, Any] | None = None,
) -> Path:
    """registry/<model>/<version> with `data` as its artifact, renamed into place."""
    framework = {".onnx": "onnx", ".joblib": "sklearn"}[Path(artifact).suffix]
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{model}-", dir=root))
    try:
        (staging / artifact).write_bytes(data)
        manifest = parse_manifest(
            {
                "name": model,
                "version": version,
                "framework": framework,
                "artifact": artifact,
                "sha256": sha256_file(staging / artifact),
                "stage": stage,
                "inputs": INPUTS,
                "outputs": OUTPUTS if outputs is None else outputs,
                "created_by": "rollguard fault tests",
                "created_at": datetime.now(UTC),
                "runtime": runtime or {},
            },
            f"{model}/{version}",
        )
        dump_manifest(manifest, staging / MANIFEST_NAME)
        (root / model).mkdir(exist_ok=True)
        target = root / model / version
        staging.rename(target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
