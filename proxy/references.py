"""Drift references: each stable version's sample of training inputs, loaded once."""

from __future__ import annotations

import io
import logging

import numpy as np

from rollguard.policy.schema import Spec
from rollguard.serving.errors import ServingError
from rollguard.serving.registry import Registry

log = logging.getLogger("rollguard.rollouts")


class DriftReferences:
    """The manifest's `reference` (a .npy/.npz of training inputs) per version, as rows."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._loaded: dict[tuple[str, str], np.ndarray | None] = {}

    def get(self, model: str, version: str) -> np.ndarray | None:
        """The version's reference rows (float32, one row per sample), or None."""
        key = (model, version)
        if key not in self._loaded:
            ref = None
            try:
                loaded = self._registry.get(model, version)
                if loaded.reference is not None:  # the bytes verified against model.yaml
                    data = np.load(io.BytesIO(loaded.reference), allow_pickle=False)
                    ref = data if isinstance(data, np.ndarray) else next(iter(data.values()))
                    ref = ref.reshape(ref.shape[0], -1).astype(np.float32)
            except (ServingError, OSError, ValueError) as exc:
                log.warning("no drift reference for %s/%s: %s", model, version, exc)
            self._loaded[key] = ref
        return self._loaded[key]

    def input_width(self, spec: Spec) -> int | None:
        """How many input columns a rollout's windows keep per request: the reference's
        width when the policy has a drift check and the stable has a reference."""
        if not any(c.metric == "drift" for c in spec.checks):
            return None
        ref = self.get(spec.model, spec.stable)
        return None if ref is None else int(ref.shape[1])
