"""Whether a shadow's answer agrees with the primary's: labels equal, numbers within tol."""

from __future__ import annotations

import numpy as np

from rollguard.serving.tensors import Tensors


def answers_agree(primary: Tensors, shadow: Tensors, tol: float) -> bool:
    """Classifiers agree on every row's label; regressors within `tol`."""
    for name in ("label", "prediction"):
        if name in primary and name in shadow:
            a, b = primary[name], shadow[name]
            if a.shape != b.shape:
                return False
            if name == "label" or a.dtype.kind in "iub":
                return bool(np.array_equal(a, b))
            return bool(np.allclose(a, b, atol=tol, rtol=0))
    common = [n for n in primary if n in shadow]
    if not common:
        return False
    a, b = primary[common[0]], shadow[common[0]]
    if a.shape != b.shape:
        return False
    if a.ndim >= 2 and a.dtype.kind == "f":
        return bool(np.array_equal(a.argmax(axis=1), b.argmax(axis=1)))
    return (
        bool(np.allclose(a, b, atol=tol, rtol=0))
        if a.dtype.kind == "f"
        else bool(np.array_equal(a, b))
    )
