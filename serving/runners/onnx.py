"""ONNX Runtime runner: one CPU InferenceSession per version, inputs and outputs by name.

The session is made from the verified bytes (base.py). A model that keeps its weights
in external data files lists them in model.yaml's `files`; those are written, with the
model, into a private 0700 directory from their verified bytes, and the session is
made from there, so ONNX Runtime never reads a file that was not hashed. A model whose
external data is not listed cannot load at all (it has nowhere to read it from).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from rollguard.serving.errors import (
    ArtifactError,
    FrameworkUnavailable,
    InvalidInput,
    ModelExecutionError,
    NotReady,
)
from rollguard.serving.hashing import PinnedBytes
from rollguard.serving.manifest import Manifest
from rollguard.serving.runners.base import IMPORT_LOCK, LocalRunner
from rollguard.serving.tensors import Tensors, as_text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _RunOptionsOfThisThread(threading.local):
    options: Any = None  # the RunOptions predict_stoppable set up for its call, if any


_THIS_THREAD = _RunOptionsOfThisThread()


def _session_from_private_copy(
    ort: Any, options: Any, name: str, model: bytes, files: dict[str, bytes]
) -> Any:
    """A session made from a private copy of the verified files (mkdtemp: mode 0700,
    nobody else can swap them), removed once made: ONNX Runtime has read the weights by
    then (a mapped file stays readable after it is unlinked)."""
    private = Path(tempfile.mkdtemp(prefix="rollguard-onnx-"))
    try:
        for file_name, data in ((name, model), *files.items()):
            (private / file_name).write_bytes(data)
        return ort.InferenceSession(
            str(private / name), sess_options=options, providers=["CPUExecutionProvider"]
        )
    finally:
        shutil.rmtree(private, ignore_errors=True)


class OnnxRunner(LocalRunner):
    """Serves a `model.onnx` with ONNX Runtime's CPU provider."""

    def __init__(
        self, manifest: Manifest, directory: Path, pinned: PinnedBytes | None = None
    ) -> None:
        super().__init__(manifest, directory, pinned)
        self._session: Any = None
        self._run: Any = None  # the session's run (see _load_sync)
        self._input_names: list[str] = []
        self._output_names: list[str] = []
        self._string_inputs: frozenset[str] = frozenset()
        self._run_options: Any = None  # onnxruntime.RunOptions, once loaded
        # id() of a running stoppable call's token -> its RunOptions (the caller keeps the
        # token alive until the call returns, so an id is never another call's meanwhile)
        self._stoppable: dict[int, Any] = {}

    def _load_sync(self) -> None:
        path = self.artifact_path
        try:
            with IMPORT_LOCK:
                import onnxruntime as ort
        except ImportError:
            raise FrameworkUnavailable(
                f"{path.name}: framework 'onnx' needs onnxruntime, which is not installed "
                "(pip install 'rollguard[onnx]')"
            ) from None
        self._run_options = ort.RunOptions
        options = ort.SessionOptions()
        # Parallelism comes from the executor's threads serving many requests at once;
        # a big intra-op pool per session would oversubscribe the cores.
        options.intra_op_num_threads = int(self.manifest.runtime.get("intra_op_threads", 1))
        options.inter_op_num_threads = 1
        pinned = self.take_pinned()
        external = {n: b for n, b in pinned.files.items() if n != self.manifest.reference}
        try:
            if external:
                session = _session_from_private_copy(
                    ort, options, path.name, pinned.artifact, external
                )
            else:
                session = ort.InferenceSession(
                    pinned.artifact, sess_options=options, providers=["CPUExecutionProvider"]
                )
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidProtobuf
            reason = _first_line(exc)
            if "model_path must not be empty" in reason or "external data" in reason.lower():
                reason = (
                    "it keeps tensors in external data files not listed in model.yaml's "
                    "`files` (each needs its sha256 there)"
                )
            raise ArtifactError(f"{path.name}: ONNX Runtime cannot load it: {reason}") from None
        input_names = [i.name for i in session.get_inputs()]
        output_names = [o.name for o in session.get_outputs()]
        self._check_declared(path, input_names, output_names)
        self._session = session
        # The compiled session's own run: InferenceSession.run adds input-name, OrtValue
        # and graph-capture checks that cannot fail for the feed built here from the
        # session's own input names and numpy arrays on the CPU provider (~1.5 µs a
        # call); the wrapper's run where a build has no `_sess`.
        self._run = getattr(getattr(session, "_sess", None), "run", None) or session.run
        self._input_names = input_names
        self._output_names = output_names
        self._string_inputs = frozenset(
            i.name for i in session.get_inputs() if i.type == "tensor(string)"
        )

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

    def predict_stoppable(self, inputs: Tensors, call: object) -> Tensors:
        """predict_sync with RunOptions of its own, which `give_up(call)` sets to
        terminate: ONNX Runtime checks the flag between nodes (a Loop's body included)
        and ends the run, so a call past its deadline frees its thread instead of
        computing for nobody."""
        if self._run_options is None:
            return self.predict_sync(inputs)
        options = self._run_options()
        self._stoppable[id(call)] = options
        _THIS_THREAD.options = options
        try:
            return self.predict_sync(inputs)
        finally:
            _THIS_THREAD.options = None
            del self._stoppable[id(call)]

    def give_up(self, call: object) -> None:
        options = self._stoppable.get(id(call))
        if options is not None:
            options.terminate = True

    def predict_sync(self, inputs: Tensors) -> Tensors:
        run = self._run  # read once: an unload may clear it meanwhile
        if run is None:
            raise NotReady(f"{self.manifest.name} {self.manifest.version} is not loaded")
        try:
            feed = {name: inputs[name] for name in self._input_names}
        except KeyError as exc:
            raise InvalidInput(f"missing input {exc.args[0]!r}") from None
        if self._string_inputs:
            for name in self._string_inputs:
                feed[name] = as_text(name, feed[name], "an ONNX string tensor")
        names = self._output_names
        try:
            results = run(names, feed, _THIS_THREAD.options)
        except Exception as exc:  # onnxruntime's errors share no public base class
            raise ModelExecutionError(_first_line(exc)) from None
        return dict(zip(names, results, strict=True))

    def _unload_sync(self) -> None:
        self._session = self._run = None
