"""What inputs and outputs an artifact declares, read without running anything in it.

`rollguard registry add` writes these into model.yaml: ONNX from the graph's declared
inputs and outputs, skops from the estimator its allow-listed types rebuild. A pickle
(`.joblib`, `.pt`, `.pt2`) runs whatever code it names when it is loaded, so it is never
loaded here unless the caller says it trusts the file (`--trust-pickle`); without that,
inputs and outputs come from flags or are left empty with a warning, never guessed.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from rollguard.serving.errors import ArtifactError
from rollguard.serving.manifest import Framework, TensorField, plain_file_name
from rollguard.serving.tensors import NUMPY_TO_V2

logger = logging.getLogger(__name__)

_Tensor = dict[str, Any]
_ONNX_TYPES = {
    "float": "FP32", "double": "FP64", "float16": "FP16", "bool": "BOOL", "string": "BYTES",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
}  # fmt: skip


def _tensor(name: str, datatype: str, dims: Any) -> _Tensor:
    # Symbolic or unknown dimensions (None, "batch", torch SymInt) become -1.
    shape = [d if isinstance(d, int) and d > 0 else -1 for d in (dims or [])]
    return {"name": name, "datatype": datatype, "shape": shape or [-1]}


def tensor_from_flag(text: str) -> _Tensor:
    """`name:DATATYPE:d1,d2,...` (e.g. `input:FP32:-1,30`) as a model.yaml tensor entry;
    ValueError saying what is wrong."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3:
        raise ValueError(f"{text!r}: expected NAME:DATATYPE:SHAPE, e.g. input:FP32:-1,30")
    name, datatype, dims = parts
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        raise ValueError(f"{text!r}: shape {dims!r} is not comma-separated integers") from None
    entry = {"name": name, "datatype": datatype.upper(), "shape": shape}
    try:
        TensorField.model_validate(entry)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    return entry


def read_signature(
    framework: Framework, path: Path, trusted: list[str], *, trust_pickle: bool = False
) -> tuple[list[_Tensor], list[_Tensor]]:
    """(inputs, outputs) of the artifact at `path` as model.yaml tensor entries. Pickles
    are loaded only with `trust_pickle`; otherwise their signature is left empty."""
    if framework == "onnx":
        return _onnx_signature(path)
    if path.suffix in (".joblib", ".pt", ".pt2") and not trust_pickle:
        logger.warning(
            "%s: a pickle runs code when loaded, so its inputs/outputs were not read; "
            "left empty in model.yaml (give them as --input/--output NAME:DATATYPE:SHAPE, "
            "or pass --trust-pickle if you would serve this file anyway)",
            path.name,
        )
        return [], []
    if framework == "sklearn":
        return _sklearn_signature(path, trusted)
    return _torch_signature(path)


def onnx_external_files(path: Path) -> list[str]:
    """File names the ONNX model at `path` keeps tensors in (external data), read from
    its graph without loading any weights; [] when the `onnx` package is not installed
    (then a model that needs them fails to load in `_onnx_signature`, saying so)."""
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors
    except ImportError:
        return []
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors share no public base class
        raise ArtifactError(f"{path.name}: not an ONNX model: {exc}") from None
    found: list[str] = []
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = ExternalDataInfo(tensor).location
        try:
            plain_file_name(location, "external data location")
        except ValueError as exc:
            raise ArtifactError(
                f"{path.name}: {exc}; rollguard pins only files next to the model"
            ) from None
        if location not in found:
            found.append(location)
    return found


def _onnx_signature(path: Path) -> tuple[list[_Tensor], list[_Tensor]]:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors share no public base class
        hint = ""
        if "external" in str(exc).lower() or "data" in str(exc).lower():
            hint = " (if it keeps weights in external data files, install onnx so they are found)"
        raise ArtifactError(f"{path.name}: ONNX Runtime cannot load it: {exc}{hint}") from None

    def tensors(args: list[Any], kind: str) -> list[_Tensor]:
        found = []
        for arg in args:
            match = re.fullmatch(r"tensor\((\w+)\)", arg.type)
            datatype = _ONNX_TYPES.get(match[1]) if match else None
            if datatype is None:
                logger.warning(
                    "%s: %s %r has type %s, which V2 cannot declare; left out of model.yaml "
                    "(for skl2onnx classifiers export with options {'zipmap': False})",
                    path.name, kind, arg.name, arg.type,
                )  # fmt: skip
                continue
            found.append(_tensor(arg.name, datatype, arg.shape))
        return found

    return tensors(session.get_inputs(), "input"), tensors(session.get_outputs(), "output")


def _sklearn_signature(path: Path, trusted: list[str]) -> tuple[list[_Tensor], list[_Tensor]]:
    if path.suffix == ".skops":
        import skops.io

        untrusted = skops.io.get_untrusted_types(file=path)
        unvouched = sorted(set(untrusted) - set(trusted))
        if unvouched:
            raise ArtifactError(
                f"{path.name}: contains types skops does not trust by default: "
                f"{', '.join(unvouched)}; not guessing: if you trust this file, pass each "
                "as a trusted type and it is written to model.yaml's trusted_types"
            )
        estimator = skops.io.load(path, trusted=untrusted)
    else:
        import joblib

        estimator = joblib.load(path)  # trust_pickle: the caller vouched for this file
    n_features = getattr(estimator, "n_features_in_", None)
    if not isinstance(n_features, int):
        logger.warning("%s: no n_features_in_; inputs left empty in model.yaml", path.name)
        return [], []
    inputs = [_tensor("input", "FP32", [-1, n_features])]
    classes = getattr(estimator, "classes_", None)
    if hasattr(estimator, "predict_proba") and classes is not None:
        kind = np.asarray(classes).dtype.kind
        label = {"i": "INT64", "u": "INT64", "b": "BOOL", "f": "FP64"}.get(kind, "BYTES")
        outputs = [
            _tensor("label", label, [-1]),
            _tensor("probabilities", "FP32", [-1, len(classes)]),
        ]
    else:
        n_outputs = getattr(estimator, "n_outputs_", 1)
        outputs = [_tensor("prediction", "FP64", [-1] if n_outputs == 1 else [-1, n_outputs])]
    return inputs, outputs


def _torch_signature(path: Path) -> tuple[list[_Tensor], list[_Tensor]]:
    try:
        import torch
    except ImportError:
        logger.warning("%s: torch is not installed; inputs/outputs left empty", path.name)
        return [], []
    if path.suffix != ".pt2":
        logger.warning(
            "%s: a TorchScript file does not record example inputs; inputs/outputs left "
            "empty in model.yaml (export with torch.export to .pt2 to have them filled)",
            path.name,
        )
        return [], []
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch raises RuntimeError, BadZipFile, pickling errors
        raise ArtifactError(f"{path.name}: torch cannot load it: {exc}") from None

    def tensor(name: str, value: Any) -> _Tensor | None:
        try:
            datatype = NUMPY_TO_V2[np.dtype(str(value.dtype).removeprefix("torch."))]
        except (AttributeError, TypeError, KeyError):
            logger.warning("%s: %r is not a tensor V2 can declare; left out", path.name, name)
            return None
        return _tensor(name, datatype, list(value.shape))

    user_inputs = set(program.graph_signature.user_inputs)
    inputs, outputs = [], []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            inputs.append(tensor(node.name, node.meta.get("val")))
        elif node.op == "output":
            for i, arg in enumerate(node.args[0]):
                outputs.append(tensor(f"output_{i}", getattr(arg, "meta", {}).get("val")))
    return [t for t in inputs if t], [t for t in outputs if t]
