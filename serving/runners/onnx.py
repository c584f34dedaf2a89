"""ONNX Runtime runner: one CPU InferenceSession per version, inputs and outputs by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rollguard.serving.errors import (
    ArtifactError,
    FrameworkUnavailable,
    InvalidInput,
    ModelExecutionError,
    NotReady,
)
from rollguard.serving.manifest import Manifest
from rollguard.serving.runners.base import LocalRunner
from rollguard.serving.tensors import Tensors


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class OnnxRunner(LocalRunner):
    """Serves a `model.onnx` with ONNX Runtime's CPU provider."""

    def __init__(
        self,
        manifest: Manifest,
        directory: Path,
    ) -> None:
        super().__init__(manifest, directory)
        self._session: Any = None
        self._input_names: list[str] = []
        self._output_names: list[str] = []

    def _load_sync(self) -> None:
        path = self.artifact_path
        try:
            import onnxruntime as ort
        except ImportError:
            raise FrameworkUnavailable(
                f"{path.name}: framework 'onnx' needs onnxruntime, which is not installed"
            ) from None
        options = ort.SessionOptions()
        # Parallelism comes from the executor's threads serving many requests at once;
        # a big intra-op pool per session would oversubscribe the cores.
        options.intra_op_num_threads = int(self.manifest.runtime.get("intra_op_threads", 1))
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidProtobuf
            raise ArtifactError(
                f"{path.name}: ONNX Runtime cannot load it: {_first_line(exc)}"
            ) from None
        input_names = [i.name for i in session.get_inputs()]
        output_names = [o.name for o in session.get_outputs()]
        self._check_declared(path, input_names, output_names)
        self._session = session
        self._input_names = input_names
        self._output_names = output_names

    def _check_declared(self, path: Path, inputs: list[str], outputs: list[str]) -> None:
        # A manifest that disagrees with its artifact is refused at load, not per request.
        declared_in = [t.name for t in self.manifest.inputs]
        if declared_in and sorted(declared_in) != sorted(inputs):
            raise ArtifactError(
                f"{path.name}: takes inputs {inputs}, model.yaml declares {declared_in}"
            )
        missing = [t.name for t in self.manifest.outputs if t.name not in outputs]
        if missing:
            raise ArtifactError(
                f"{path.name}: has no output(s) {missing} declared in model.yaml; "
                f"it gives {outputs}"
            )

    def predict_sync(self, inputs: Tensors) -> Tensors:
        session = self._session
        if session is None:
            raise NotReady(f"{self.manifest.name} {self.manifest.version} is not loaded")
        try:
            feed = {name: inputs[name] for name in self._input_names}
        except KeyError as exc:
            raise InvalidInput(f"missing input {exc.args[0]!r}") from None
        try:
            results = session.run(self._output_names, feed)
        except Exception as exc:  # onnxruntime's errors share no public base class
            raise ModelExecutionError(_first_line(exc)) from None
        return dict(zip(self._output_names, results, strict=True))

    def _unload_sync(self) -> None:
        self._session = None
