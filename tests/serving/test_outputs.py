"""Output checks: a cast to a declared integer never changes a value, and the fast check
agrees with the one that names what is wrong."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rollguard.serving.errors import ModelExecutionError
from rollguard.serving.manifest import Manifest, parse_manifest
from rollguard.serving.outputs import (
    all_finite,
    array_problems,
    arrays_fit,
    cast_output,
    declared_outputs,
    non_finite,
)


def _manifest(outputs: list[dict[str, Any]]) -> Manifest:
    return parse_manifest(
        {
            "name": "m",
            "version": "1",
            "framework": "onnx",
            "artifact": "model.onnx",
            "sha256": "0" * 64,
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
            "outputs": outputs,
        },
        "m/1",
    )


MANIFEST = _manifest([{"name": "label", "datatype": "INT64", "shape": [-1]}])
FLOATS = hnp.arrays(
    np.float64,
    hnp.array_shapes(max_dims=2, max_side=5),
    elements=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(2**64), 2**64).map(float),
        st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0**63, -(2.0**63)]),
    ),
)


@given(FLOATS, st.sampled_from(["int8", "int32", "int64", "uint8", "uint64", "bool"]))
def test_a_cast_to_an_integer_is_exact_or_refused(value: np.ndarray, name: str) -> None:
    dtype = np.dtype(name)
    finite = bool(np.isfinite(value).all())
    whole = finite and bool((value == np.trunc(value)).all())
    low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    fits = whole and all(low <= int(v) <= high for v in value.ravel())
    if not fits:
        with pytest.raises(ModelExecutionError, match="m 1 answered outside its manifest"):
            cast_output(value, dtype, MANIFEST, "label")
        return
    cast = cast_output(value, dtype, MANIFEST, "label")
    assert cast.dtype == dtype and cast.shape == value.shape
    assert [int(v) for v in cast.ravel()] == [int(v) for v in value.ravel()]


def test_nan_is_named_with_the_model_version_and_output() -> None:
    with pytest.raises(ModelExecutionError) as caught:
        cast_output(np.array([1.0, np.nan]), np.dtype(np.int64), MANIFEST, "label")
    assert str(caught.value) == (
        "m 1 answered outside its manifest: output 'label': 1 of 2 values are NaN or "
        "infinite, which its declared datatype INT64 cannot carry"
    )


def test_floats_pass_to_a_float_output_as_they_are() -> None:
    value = np.array([np.nan, np.inf, 0.5])
    cast = cast_output(value, np.dtype(np.float32), MANIFEST, "p")
    assert cast.dtype == np.float32 and np.isnan(cast[0]) and np.isinf(cast[1])


DECLARED = declared_outputs(
    _manifest(
        [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "names", "datatype": "BYTES", "shape": [-1, 1]},
        ]
    )
)
_ARRAY = st.tuples(
    st.sampled_from([np.int64, np.int32, np.float32, np.float64, object]),
    st.lists(st.integers(0, 3), max_size=3),
).map(lambda a: np.zeros(a[1], dtype=a[0]))


@given(
    st.dictionaries(st.sampled_from(["label", "probabilities", "names", "extra"]), _ARRAY),
    st.integers(0, 3),
)
def test_the_fast_check_agrees_with_the_one_that_names_problems(
    outputs: dict[str, np.ndarray], rows: int
) -> None:
    assert arrays_fit(DECLARED, outputs, rows) == (array_problems(DECLARED, outputs, rows) == [])


def test_what_fits() -> None:
    outputs: dict[str, np.ndarray] = {
        "label": np.zeros(2, np.int64),
        "probabilities": np.zeros((2, 2), np.float32),
        "names": np.array([["a"], ["b"]], dtype=object),
        "extra": np.zeros(7),  # not declared: passes through
    }
    assert arrays_fit(DECLARED, outputs, 2)
    assert array_problems(DECLARED, outputs, 3) == [
        "output 'label': 2 rows for a request of 3",
        "output 'probabilities': 2 rows for a request of 3",
        "output 'names': 2 rows for a request of 3",
    ]


def _floats_of(width: int) -> st.SearchStrategy[np.ndarray]:
    dtype = np.dtype(f"float{width}")
    largest = float(np.finfo(dtype).max)
    return hnp.arrays(
        dtype,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9),
        elements=st.one_of(
            st.floats(width=width),  # type: ignore[arg-type]  # 16, 32 or 64
            st.sampled_from([largest, -largest, np.nan, np.inf, -np.inf]),
        ),
    )


ANY_FLOATS = st.sampled_from([16, 32, 64]).flatmap(_floats_of)


@given(ANY_FLOATS)
def test_the_finite_check_agrees_with_numpys(value: np.ndarray) -> None:
    """The summed fast path is exact: finite values that overflow the sum (float64's
    largest, added) and every NaN or infinity, in arrays small and large."""
    expected = bool(np.isfinite(value).all())
    assert all_finite(value) is expected
    problems = non_finite({"p": value})
    assert (not problems) is expected
    if not expected:
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        assert problems == [
            f"output 'p': {bad} of {value.size} values are NaN or infinite, which a V2 "
            "answer cannot carry"
        ]


def test_finite_float64_values_whose_sum_overflows_are_finite() -> None:
    big = np.full((1, 4), np.finfo(np.float64).max)
    assert all_finite(big)
    assert not all_finite(np.array([[np.inf, -np.inf]]))
