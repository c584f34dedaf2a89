"""scikit-learn runner: `model.skops` (types allow-listed) or `model.joblib` (pickle).

Security: a joblib file is a pickle, and unpickling runs whatever code the file names.
The runner unpickles the very buffer whose sha256 matched model.yaml (base.py), so only
the exact bytes an operator pinned are ever unpickled, whatever happens to the file on
disk meanwhile. skops files are safer: every type they contain must be on skops' safe
list or in `trusted_types`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from rollguard.serving.errors import (
    ArtifactError,
    FrameworkUnavailable,
    InvalidInput,
    ModelExecutionError,
    NotReady,
)
from rollguard.serving.hashing import PinnedBytes
from rollguard.serving.manifest import Manifest
from rollguard.serving.outputs import cast_output
from rollguard.serving.runners.base import IMPORT_LOCK, LocalRunner
from rollguard.serving.tensors import Tensors, as_text

# Output names this runner knows how to compute, and the estimator method behind each.
KNOWN_OUTPUTS = ("label", "probabilities", "prediction")
_DEFAULT_DTYPES: dict[str, np.dtype] = {
    "probabilities": np.dtype(np.float32),
    "prediction": np.dtype(np.float64),
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_skops(path: Path, data: bytes, allowed: list[str]) -> Any:
    import skops.io

    untrusted = skops.io.get_untrusted_types(data=data)
    refused = sorted(t for t in untrusted if t not in allowed)
    if refused:
        raise ArtifactError(
            f"{path.name}: contains types skops does not trust: {', '.join(refused)}; "
            "if you trust this file, add them to `trusted_types` in model.yaml"
        )
    return skops.io.loads(data, trusted=untrusted)


def _load_joblib(data: bytes) -> Any:
    import joblib

    return joblib.load(io.BytesIO(data))


class SklearnRunner(LocalRunner):
    """Serves an estimator; the first declared input is its 2-D feature matrix."""

    def __init__(
        self, manifest: Manifest, directory: Path, pinned: PinnedBytes | None = None
    ) -> None:
        super().__init__(manifest, directory, pinned)
        self._model: Any = None
        self._outputs: dict[str, np.dtype | None] = {}

    def _load_sync(self) -> None:
        path = self.artifact_path
        data = self.take_pinned().artifact
        try:
            with IMPORT_LOCK:
                import joblib  # noqa: F401 - the [sklearn] extra: a missing one is named, not a 500
                import sklearn  # noqa: F401
                import skops.io  # noqa: F401
        except ImportError as exc:
            raise FrameworkUnavailable(
                f"{path.name}: framework 'sklearn' needs scikit-learn and skops, which are not "
                f"installed ({exc.name} missing; pip install 'rollguard[sklearn]')"
            ) from None
        try:
            with IMPORT_LOCK:  # unpickling imports the estimator's modules
                if path.suffix == ".skops":
                    model = _load_skops(path, data, self.manifest.trusted_types)
                else:
                    model = _load_joblib(data)
        except ArtifactError:
            raise
        except OSError as exc:
            raise ArtifactError(f"{path.name}: cannot read: {exc.strerror or exc}") from None
        except Exception as exc:  # unpicklers raise anything: BadZipFile, EOFError, KeyError...
            raise ArtifactError(
                f"{path.name}: cannot load it: {type(exc).__name__}: {_first_line(exc)}"
            ) from None
        self._outputs = self._choose_outputs(path, model)
        self._model = model

    def _choose_outputs(self, path: Path, model: Any) -> dict[str, np.dtype | None]:
        with IMPORT_LOCK:
            from sklearn.base import is_classifier

        if not callable(getattr(model, "predict", None)):
            raise ArtifactError(f"{path.name}: holds a {type(model).__name__}, not an estimator")
        has_proba = hasattr(model, "predict_proba")
        declared = {t.name: t.spec().dtype for t in self.manifest.outputs}
        if not declared:
            if is_classifier(model) or has_proba:
                names = ["label", "probabilities"] if has_proba else ["label"]
            else:
                names = ["prediction"]
            return {name: _DEFAULT_DTYPES.get(name) for name in names}
        unknown = [name for name in declared if name not in KNOWN_OUTPUTS]
        if unknown:
            raise ArtifactError(
                f"{path.name}: model.yaml declares output(s) {unknown}; a scikit-learn model "
                f"gives {list(KNOWN_OUTPUTS)}"
            )
        if "probabilities" in declared and not has_proba:
            raise ArtifactError(
                f"{path.name}: model.yaml declares 'probabilities' but "
                f"{type(model).__name__} has no predict_proba"
            )
        # BYTES outputs (string labels) are passed through as the estimator returns them.
        return {name: None if dtype.kind == "O" else dtype for name, dtype in declared.items()}

    def _features(self, inputs: Tensors) -> np.ndarray:
        """The estimator's input: a 2-D batch, or for text (BYTES) a 1-D batch of documents
        as str (a CountVectorizer/TfidfVectorizer pipeline) or a 2-D batch of str."""
        if self.manifest.inputs:
            name = self.manifest.inputs[0].name
            if name not in inputs:
                raise InvalidInput(f"missing input '{name}'")
        elif len(inputs) == 1:
            name = next(iter(inputs))
        else:
            raise InvalidInput(f"a scikit-learn model takes one input, got {sorted(inputs)}")
        features = inputs[name]
        if features.dtype.kind in "OSU":
            if features.ndim not in (1, 2):
                raise InvalidInput(
                    f"input '{name}': a scikit-learn model takes text as a 1-D batch of "
                    "documents or a 2-D batch"
                )
            return as_text(name, features, "a scikit-learn model")
        if features.ndim != 2:
            raise InvalidInput(f"input '{name}': a scikit-learn model takes a 2-D batch")
        return features

    def predict_sync(self, inputs: Tensors) -> Tensors:
        model = self._model
        if model is None:
            raise NotReady(f"{self.manifest.name} {self.manifest.version} is not loaded")
        features = self._features(inputs)
        outputs: Tensors = {}
        predicted: np.ndarray | None = None
        try:
            for name, dtype in self._outputs.items():
                if name == "probabilities":
                    value = np.asarray(model.predict_proba(features))
                else:
                    # label and prediction are both predict(); call it once.
                    if predicted is None:
                        predicted = np.asarray(model.predict(features))
                    value = predicted
                # NaN never becomes an arbitrary integer: the model's failure (serving/outputs.py).
                outputs[name] = (
                    value if dtype is None else cast_output(value, dtype, self.manifest, name)
                )
        except ModelExecutionError:
            raise
        except Exception as exc:  # the estimator's own error, whatever its type
            raise ModelExecutionError(_first_line(exc)) from None
        return outputs

    def _unload_sync(self) -> None:
        self._model = None
