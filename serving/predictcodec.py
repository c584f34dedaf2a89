"""The simple `/predict` format for callers that do not speak V2: rows in, rows out.

`{"features": F}` is one row and `{"instances": [F, ...]}` several; F is a list of
numbers (one-input models), an object keyed by input name, or, for inputs whose
manifest declares `features` (serving/features.py), an object keyed by feature name.
Rows are checked against the declared feature schemas before they become tensors.
Answers are rows of {output name: value}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rollguard.serving.codec import parse_json
from rollguard.serving.errors import InvalidInput
from rollguard.serving.features import Feature, check_row
from rollguard.serving.tensors import Tensors, TensorSpec

FeatureSchemas = Mapping[str, Sequence[Feature]]  # input name -> its columns' schemas


def decode_predict_request(
    body: bytes, specs: Sequence[TensorSpec], features: FeatureSchemas | None = None
) -> tuple[Tensors, str | None, bool]:
    """Parse the simple `/predict` body into tensors for a model's declared inputs.

    `{"features": F}` is one row, `{"instances": [F, ...]}` several. F is either a list of
    numbers (models with one input: that input's row) or an object keyed by input name
    or by feature name. `features` holds the declared schemas; a value that breaks one is
    InvalidInput naming the row and the feature.
    Returns (tensors, request id, whether it was a single-row `features` request).
    """
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    if ("features" in doc) == ("instances" in doc):
        raise InvalidInput("give exactly one of 'features' (one row) or 'instances' (rows)")
    single = "features" in doc
    rows = [doc["features"]] if single else doc["instances"]
    if not isinstance(rows, list) or not rows:
        raise InvalidInput("'instances' must be a non-empty list")
    if not specs:
        raise InvalidInput("the model declares no inputs; use the V2 infer endpoint")
    features = features or {}
    by_feature = {f.name: name for name, fs in features.items() for f in fs}
    matrices = {s.name for s in specs if len(s.shape) > 1}  # their rows are lists
    columns: dict[str, list[Any]] = {s.name: [] for s in specs}
    for i, row in enumerate(rows):
        if isinstance(row, list):
            if len(specs) != 1:
                raise InvalidInput(
                    f"row {i}: a list fits only one-input models; name the inputs "
                    f"{[s.name for s in specs]}"
                )
            columns[specs[0].name].append(row)
        elif isinstance(row, dict):
            if by_feature:
                row = _inputs_of(row, i, features, by_feature, matrices, columns)
            unknown = set(row) - set(columns)
            if unknown:
                raise InvalidInput(f"row {i}: unknown input(s) {sorted(unknown)}")
            for s in specs:
                if s.name not in row:
                    raise InvalidInput(f"row {i}: missing input '{s.name}'")
                columns[s.name].append(row[s.name])
        else:
            raise InvalidInput(f"row {i}: expected a list or an object")
    for name, schema in features.items():
        for i, values in enumerate(columns.get(name, ())):
            check_row(name, schema, values, i)
    tensors: Tensors = {}
    for s in specs:
        try:
            with np.errstate(over="ignore"):  # refused just below, not warned about
                array = np.asarray(columns[s.name], dtype=s.dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidInput(f"input '{s.name}': values do not fit {s.datatype}: {exc}") from None
        # JSON has no NaN or infinity: one here is a null or a number beyond the dtype.
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidInput(f"input '{s.name}': null or a value beyond {s.datatype}'s range")
        tensors[s.name] = array
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    return tensors, request_id, single


def _inputs_of(
    row: dict[str, Any],
    i: int,
    features: FeatureSchemas,
    by_feature: Mapping[str, str],
    matrices: set[str],
    inputs: Mapping[str, Any],
) -> dict[str, Any]:
    """A row keyed by feature names (mixed with input names) as a row keyed by inputs:
    each input's features gathered in column order."""
    out: dict[str, Any] = {}
    named: dict[str, dict[str, Any]] = {}
    for key, value in row.items():
        if key in inputs and key not in by_feature:
            out[key] = value
        elif key in by_feature:
            named.setdefault(by_feature[key], {})[key] = value
        else:
            raise InvalidInput(f"row {i}: unknown input or feature {key!r}")
    for name, given in named.items():
        if name in out:
            raise InvalidInput(f"row {i}: input {name!r} is given both whole and by feature")
        missing = [f.name for f in features[name] if f.name not in given]
        if missing:
            raise InvalidInput(f"row {i}: missing feature(s) {missing}")
        values = [given[f.name] for f in features[name]]
        out[name] = values if name in matrices else values[0]
    return out


def encode_predictions(outputs: Tensors, single: bool) -> list[dict[str, Any]] | dict[str, Any]:
    """Rows of {output name: value} for the simple `/predict` response."""
    n = next(iter(outputs.values())).shape[0] if outputs else 0
    lists = {
        k: (v.tolist() if v.dtype != object else [str(x) for x in v]) for k, v in outputs.items()
    }
    rows = [{k: lists[k][i] for k in lists} for i in range(n)]
    return rows[0] if single and rows else rows
