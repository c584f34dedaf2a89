"""BYTES tensors in the binary extension decode to their declared shape, element for element."""

from __future__ import annotations

import numpy as np
import orjson
from hypothesis import given
from hypothesis import strategies as st

from rollguard.serving.messages import InferRequest


@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=3).flatmap(
        lambda shape: st.tuples(
            st.just(shape),
            st.lists(
                st.binary(max_size=6),
                min_size=int(np.prod(shape)),
                max_size=int(np.prod(shape)),
            ),
        )
    )
)
def test_binary_bytes_keep_shape_and_values(case: tuple[list[int], list[bytes]]) -> None:
    shape, values = case
    # The extension's layout: each element a 4-byte little-endian length, then its bytes.
    payload = b"".join(len(v).to_bytes(4, "little") + v for v in values)
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "datatype": "BYTES",
                    "shape": shape,
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
    )
    decoded = InferRequest.decode(head + payload, str(len(head))).arrays()["s"]
    assert decoded.shape == tuple(shape)
    assert decoded.reshape(-1).tolist() == values
