"""The simple /predict format: rows in as features or instances, rows out."""

from __future__ import annotations

import numpy as np
import pytest

from rollguard.serving.errors import InvalidInput
from rollguard.serving.predictcodec import decode_predict_request, encode_predictions
from rollguard.serving.tensors import TensorSpec


def test_predict_body_features_and_instances() -> None:
    specs = [TensorSpec("input", "FP32", (-1, 3))]
    tensors, rid, single = decode_predict_request(b'{"features": [1, 2, 3], "id": "z"}', specs)
    assert tensors["input"].shape == (1, 3) and single and rid == "z"
    tensors, _, single = decode_predict_request(
        b'{"instances": [{"input": [1, 2, 3]}, [4, 5, 6]]}', specs
    )
    assert tensors["input"].shape == (2, 3) and not single
    with pytest.raises(InvalidInput, match="exactly one"):
        decode_predict_request(b'{"features": [1], "instances": [[1]]}', specs)
    rows = encode_predictions({"label": np.array([1, 0])}, single=False)
    assert rows == [{"label": 1}, {"label": 0}]
