"""What the windows read from an answer, whatever the model's outputs hold."""

from __future__ import annotations

import math

import numpy as np

from rollguard.proxy.answers import prediction_of


def test_prediction_is_label_then_prediction_then_first_rows_argmax() -> None:
    probabilities = np.array([[0.2, 0.8], [0.9, 0.1]], dtype=np.float32)
    assert prediction_of({"probabilities": probabilities, "label": np.array([4, 0])}) == 4.0
    assert prediction_of({"probabilities": probabilities, "prediction": np.array([2.5])}) == 2.5
    assert prediction_of({"probabilities": probabilities}) == 1.0


def test_outputs_without_a_number_give_nan_not_an_error() -> None:
    """A first output of strings or of no rows has no prediction (argmax would raise)."""
    assert math.isnan(prediction_of({}))
    assert math.isnan(prediction_of({"names": np.array([[b"a", b"b"]], dtype=object)}))
    assert math.isnan(prediction_of({"scores": np.zeros((0, 3), dtype=np.float32)}))
    assert math.isnan(prediction_of({"label": np.array(["yes"])}))
