"""Reading the prediction a manifest declares, and comparing it with a label."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from rollguard.serving.codec import tensors_from_outputs
from rollguard.serving.errors import ManifestError, UpstreamError
from rollguard.serving.manifest import parse_manifest
from rollguard.serving.messages import InferResponse
from rollguard.serving.prediction import (
    DEFAULT_RULE,
    Predicted,
    Rule,
    agreeing,
    is_missing,
    matches,
    read_arrays,
    read_items,
    rows_of,
)


def _item(name: str, datatype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def _both(rule: Rule, *items: dict[str, Any]) -> tuple[Predicted, Predicted]:
    """The prediction read off the JSON objects and off their arrays."""
    listed = list(items)
    return read_items(rule, listed), read_arrays(rule, tensors_from_outputs(listed))


PREDICT = _item("predict", "INT64", [3, 1], [1, 0, 1])  # MLServer's scikit-learn answer
NAMES = _item("predict", "BYTES", [2, 1], ["malignant", "benign"])
PROBA = _item("predict_proba", "FP64", [2, 2], [0.2, 0.8, 0.9, 0.1])
SCORE = _item("score", "FP32", [2], [0.75, 0.1])


def test_an_n_by_1_column_is_its_value_not_an_argmax() -> None:
    assert _both(DEFAULT_RULE, PREDICT) == (1.0, 1.0)
    assert _both(Rule("predict", "label"), PREDICT) == (1.0, 1.0)
    assert _both(Rule("predict", "value"), PREDICT) == (1.0, 1.0)


def test_class_names_are_read_as_text() -> None:
    assert _both(Rule("predict", "label"), NAMES) == ("malignant", "malignant")
    assert _both(DEFAULT_RULE, NAMES) == ("malignant", "malignant")
    assert all(is_missing(p) for p in _both(Rule("predict", "argmax"), NAMES))


def test_argmax_of_probabilities_with_and_without_class_names() -> None:
    assert _both(Rule("predict_proba", "argmax"), PREDICT, PROBA) == (1.0, 1.0)
    named = Rule("predict_proba", "argmax", classes=["malignant", "benign"])
    assert _both(named, PROBA) == ("benign", "benign")
    assert rows_of(named, tensors_from_outputs([PROBA])) == ["benign", "malignant"]
    # A label read of a two-wide row is no prediction: the manifest named the wrong read.
    assert all(is_missing(p) for p in _both(Rule("predict_proba", "label"), PROBA))


def test_threshold_on_a_score_or_on_the_positive_class_probability() -> None:
    assert _both(Rule("score", "threshold", threshold=0.7), SCORE) == (1.0, 1.0)
    assert _both(Rule("score", "threshold", threshold=0.8), SCORE) == (0.0, 0.0)
    named = Rule("predict_proba", "threshold", threshold=0.5, classes=["no", "yes"])
    assert _both(named, PROBA) == ("yes", "yes")
    assert rows_of(named, tensors_from_outputs([PROBA])) == ["yes", "no"]


def test_a_named_output_that_is_absent_gives_no_prediction() -> None:
    assert all(is_missing(p) for p in _both(Rule("predict_proba", "argmax"), PREDICT))
    assert rows_of(Rule("predict_proba", "argmax"), tensors_from_outputs([PREDICT])) == []


def test_the_response_reads_by_its_versions_rule() -> None:
    body = orjson.dumps({"outputs": [PREDICT, PROBA]})
    assert InferResponse.of_upstream(body).prediction(Rule("predict_proba", "argmax")) == 1.0
    assert InferResponse.of_upstream(body).prediction() == 1.0  # default: first output


# --- comparing -----------------------------------------------------------------------------


def test_labels_match_numbers_and_class_names() -> None:
    assert matches(1.0, 1.0, 0.0) and not matches(1.0, 0.0, 0.0)
    assert matches(10.0, 10.4, 0.5) and not matches(10.0, 11.0, 0.5)
    assert matches("malignant", "malignant", 0.0) and not matches("malignant", "benign", 0.0)
    assert matches("1", 1.0, 0.0) and matches(1.0, "1", 0.0)  # a number by its text
    assert not matches(float("nan"), 1.0, 1e9)  # no prediction matches nothing
    assert not matches(float("nan"), "nan", 0.0)


_PREDICTED = st.one_of(
    st.floats(allow_infinity=False), st.integers(-5, 5).map(float), st.text(max_size=4)
)


@given(_PREDICTED, _PREDICTED, st.sampled_from([0.0, 0.5]))
def test_matching_is_symmetric_and_reflexive(a: Predicted, b: Predicted, tol: float) -> None:
    assert matches(a, b, tol) == matches(b, a, tol)
    assert matches(a, a, tol) != is_missing(a)


def test_agreement_takes_every_row() -> None:
    assert agreeing([1.0, 0.0], [1.0, 0.0], 0.0) == 2
    assert agreeing([1.0, 0.0], [1.0, 1.0], 0.0) == 1  # row 1 differs
    assert agreeing([1.0], [1.0, 0.0], 0.0) == 0 and agreeing([], [], 0.0) == 0
    assert agreeing(["a", "b"], ["a", "b"], 0.0) == 2
    assert agreeing([float("nan")], [float("nan")], 0.0) == 0


# --- the items path reads what the arrays path reads ---------------------------------------

_RULES = st.one_of(
    st.just(DEFAULT_RULE),
    st.builds(
        Rule,
        st.sampled_from(["label", "prediction", "probabilities", "score"]),
        st.sampled_from(["label", "argmax", "value"]),
    ),
    st.builds(
        lambda name, threshold: Rule(name, "threshold", threshold=threshold),
        st.sampled_from(["probabilities", "score"]),
        st.floats(-1, 1),
    ),
)


@st.composite
def outputs(draw: st.DrawFn) -> list[dict[str, Any]]:
    items = []
    for name in draw(st.lists(st.sampled_from(["label", "probabilities", "score"]), max_size=3,
                              unique=True)):  # fmt: skip
        shape = draw(st.sampled_from([[1], [2], [2, 1], [1, 3], [2, 2], [0], [0, 2], [2, 1, 2]]))
        count = int(np.prod(shape))
        datatype = draw(st.sampled_from(["INT64", "INT8", "FP32", "FP64", "BYTES", "BOOL"]))
        values = st.one_of(
            st.integers(-5, 5), st.floats(-1e3, 1e3, width=32), st.booleans(), st.text(max_size=2)
        )
        data = draw(st.lists(values, min_size=count, max_size=count))
        items.append(_item(name, datatype, shape, data))
    return items


def _converts(item: dict[str, Any]) -> bool:
    try:
        tensors_from_outputs([item])
    except UpstreamError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(outputs(), _RULES)
def test_items_and_arrays_read_the_same_prediction(items: list[dict[str, Any]], rule: Rule) -> None:
    items = orjson.loads(json.dumps({"outputs": items}))["outputs"]
    kept = [item for item in items if _converts(item)]
    from_items = read_items(rule, kept)
    from_arrays = read_arrays(rule, tensors_from_outputs(kept))
    assert from_items == from_arrays or (is_missing(from_items) and is_missing(from_arrays))


# --- the manifest block ----------------------------------------------------------------------


def _manifest(prediction: dict[str, Any], outputs: list[str] | None = None) -> Any:
    doc: dict[str, Any] = {
        "name": "m",
        "version": "1",
        "framework": "http",
        "endpoint": "http://127.0.0.1:9/v2/models/m",
        "prediction": prediction,
    }
    if outputs is not None:
        doc["outputs"] = [{"name": n, "datatype": "FP32", "shape": [-1, 2]} for n in outputs]
    return parse_manifest(doc, "model.yaml")


def test_the_manifest_block_becomes_the_rule() -> None:
    rule = _manifest({"output": "p", "read": "argmax", "classes": ["a", 1]}, ["p"]).prediction_rule
    assert (rule.output, rule.read, rule.classes) == ("p", "argmax", ("a", "1"))
    assert _manifest({"output": "p"}).prediction_rule.read == "label"


@pytest.mark.parametrize(
    ("block", "outputs", "fragment"),
    [
        ({"output": "p", "read": "threshold"}, None, "threshold"),
        ({"output": "p", "read": "label", "threshold": 0.5}, None, "threshold"),
        ({"output": "p", "read": "label", "classes": ["a"]}, None, "classes"),
        ({"output": "p", "read": "threshold", "threshold": 0.5, "classes": ["a"]}, None, "two"),
        ({"output": "q"}, ["p"], "not among the declared outputs"),
        ({"output": "p", "read": "mode"}, None, "prediction.read"),
        ({"output": "p", "extra": 1}, None, "extra"),
    ],
)
def test_a_block_that_does_not_hold_is_refused_naming_it(
    block: dict[str, Any], outputs: list[str] | None, fragment: str
) -> None:
    with pytest.raises(ManifestError, match=fragment):
        _manifest(block, outputs)


_SHAPES = array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=6)
_ARRAYS = st.one_of(
    arrays(np.float32, _SHAPES, elements=st.one_of(st.floats(-10, 10, width=32), st.just(np.nan))),
    arrays(np.int64, _SHAPES, elements=st.integers(-3, 3)),
    arrays(np.bool_, _SHAPES),
    arrays(object, _SHAPES, elements=st.sampled_from(["a", "b", "héllo", b"a", 1])),
)
_ROW_RULES = st.one_of(
    st.just(DEFAULT_RULE),
    st.sampled_from(["label", "argmax", "value"]).map(lambda read: Rule("out", read)),  # type: ignore[arg-type]
    st.floats(0, 1).map(lambda t: Rule("out", "threshold", threshold=t, classes=["no", "yes"])),
    st.just(Rule("out", "argmax", classes=["x", "y"])),
)


@settings(max_examples=300)
@given(array=_ARRAYS, rule=_ROW_RULES, default_name=st.sampled_from(["out", "label", "scores"]))
def test_rows_of_reads_each_row_as_read_arrays_does(
    array: np.ndarray, rule: Rule, default_name: str
) -> None:
    """The whole-array reading of a batch is the per-row reading, row by row."""
    outputs = {default_name if rule.output is None else "out": array}
    rows = rows_of(rule, outputs)
    expected = [read_arrays(rule, outputs, i) for i in range(len(rows))]
    assert len(rows) == (0 if array.size == 0 else array.shape[0])
    assert all(
        (is_missing(a) and is_missing(b)) or (a == b and type(a) is type(b))
        for a, b in zip(rows, expected, strict=True)
    )
