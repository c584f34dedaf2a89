"""Registry directory operations without loading models: walk, verify, show, add.

These are the file operations behind `rollguard registry list|show|verify|add`; the
Registry uses the same walk and the same verification before it loads anything.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from serving.errors import (
    ArtifactError,
    ManifestError,
    ModelNotFound,
    ServingError,
    VersionNotFound,
)
from serving.hashing import sha256_file
from serving.manifest import (
    ARTIFACT_SUFFIXES,
    MANIFEST_NAME,
    Framework,
    Manifest,
    Stage,
    dump_manifest,
    load_manifest,
)
from serving.tensors import NUMPY_TO_V2

logger = logging.getLogger(__name__)

Status = Literal["ok", "refused"]


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Natural sort key: digit runs compare as numbers, so 1.2.0 < 1.10.0."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.findall(r"\d+|\D+", version)
    )


def subdirectories(path: Path) -> list[Path]:
    """Visible subdirectories (symlinks followed), sorted; hidden names are skipped
    because Kubernetes keeps its `..data` swap targets and we keep half-added versions
    under dot-names."""
    try:
        entries = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        try:
            if not entry.name.startswith(".") and entry.is_dir():
                found.append(Path(entry.path))
        except OSError:  # vanished or dangling while we looked
            continue
    return sorted(found)


def version_directories(root: Path) -> list[tuple[str, str, Path]]:
    """Every root/<model>/<version> directory as (model, version, path)."""
    return [
        (model_dir.name, version_dir.name, version_dir)
        for model_dir in subdirectories(root)
        for version_dir in subdirectories(model_dir)
    ]


def verify_directory(directory: Path, model: str, version: str) -> Manifest:
    """The version's manifest once it validates, names its directories and its
    artifact's sha256 matches; ManifestError / ArtifactError naming the file otherwise.
    Blocking (reads and hashes the artifact): call it off the event loop."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ManifestError(f"{manifest_path}: missing")
    try:
        manifest = load_manifest(manifest_path)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{manifest_path}: not UTF-8 text: {exc.reason}") from None
    for field, value, expected in (
        ("name", manifest.name, model),
        ("version", manifest.version, version),
    ):
        if value != expected:
            raise ManifestError(
                f"{manifest_path}: {field} {value!r} does not match its directory {expected!r}"
            )
    if manifest.framework == "http":
        return manifest
    assert manifest.artifact is not None
    artifact = directory / manifest.artifact
    if not artifact.is_file():
        raise ArtifactError(f"{artifact}: artifact named in model.yaml is missing")
    try:
        actual = sha256_file(artifact)
    except OSError as exc:
        raise ArtifactError(f"{artifact}: cannot read: {exc.strerror or exc}") from None
    if actual != manifest.sha256:
        raise ArtifactError(
            f"{artifact}: sha256 {actual} does not match {manifest.sha256} in model.yaml"
        )
    return manifest


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One version directory as `registry list` / `verify` report it."""

    model: str
    version: str
    directory: Path
    status: Status
    reason: str | None = None
    manifest: Manifest | None = None

    @property
    def framework(self) -> str | None:
        return self.manifest.framework if self.manifest else None

    @property
    def stage(self) -> str | None:
        return self.manifest.stage if self.manifest else None

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "framework": self.framework,
            "stage": self.stage,
            "status": self.status,
            "reason": self.reason,
            "directory": str(self.directory),
        }


def _inspect(model: str, version: str, directory: Path) -> VersionInfo:
    try:
        manifest = verify_directory(directory, model, version)
    except ServingError as exc:
        try:  # still report framework and stage when only the artifact is at fault
            partial: Manifest | None = load_manifest(directory / MANIFEST_NAME)
        except (ManifestError, UnicodeDecodeError):
            partial = None
        return VersionInfo(model, version, directory, "refused", str(exc), partial)
    return VersionInfo(model, version, directory, "ok", None, manifest)


def list_versions(root: Path) -> list[VersionInfo]:
    """Every version under root, verified (manifest and sha256) but not loaded."""
    found = version_directories(root)
    found.sort(key=lambda item: (item[0], version_key(item[1])))
    return [_inspect(model, version, directory) for model, version, directory in found]


def verify(root: Path) -> list[VersionInfo]:
    """Same check as list_versions; the CLI exits non-zero if any status is 'refused'."""
    return list_versions(root)


def show(root: Path, model: str, version: str) -> dict[str, Any]:
    """One version's manifest and verification result; ModelNotFound / VersionNotFound."""
    if not (root / model).is_dir():
        raise ModelNotFound(f"no model {model!r} in {root}")
    directory = root / model / version
    if not directory.is_dir():
        raise VersionNotFound(f"model {model!r} has no version {version!r} in {root}")
    info = _inspect(model, version, directory)
    result = info.to_json()
    result["manifest"] = info.manifest.model_dump(mode="json") if info.manifest else None
    return result


def infer_framework(artifact: Path) -> Framework:
    """The framework an artifact's suffix implies."""
    frameworks: tuple[Framework, ...] = ("onnx", "torch", "sklearn")
    for framework in frameworks:
        if artifact.suffix in ARTIFACT_SUFFIXES[framework]:
            return framework
    known = ", ".join(s for suffixes in ARTIFACT_SUFFIXES.values() for s in suffixes)
    raise ArtifactError(f"{artifact}: cannot tell the framework from its suffix (known: {known})")


def add(
    root: Path,
    artifact: Path | None,
    *,
    model: str,
    version: str,
    framework: Framework | None = None,
    stage: Stage = "development",
    parent: str | None = None,
    created_by: str | None = None,
    endpoint: str | None = None,
    trusted_types: list[str] | None = None,
) -> Path:
    """Copy an artifact into root/model/version with a model.yaml; returns the directory.

    Inputs and outputs are read from the artifact where its format states them,
    otherwise left empty with a warning. `trusted_types` are skops types the caller
    vouches for (never guessed). For `framework="http"` pass `endpoint`, no artifact.
    The version is assembled under a hidden name in root and renamed into place, so a
    watching registry never sees it half-copied; an existing version is never
    overwritten (FileExistsError).
    """
    if framework is None:
        if artifact is None:
            if not endpoint:
                raise ArtifactError("give an artifact file, or an endpoint for framework http")
            framework = "http"
        else:
            framework = infer_framework(artifact)
    target = root / model / version
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target}: version already exists; versions are never overwritten")
    if framework != "http" and (artifact is None or not artifact.is_file()):
        raise ArtifactError(f"{artifact}: no such file")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adding-", dir=root))
    try:
        fields: dict[str, Any] = {
            "name": model,
            "version": version,
            "framework": framework,
            "endpoint": endpoint,
            "stage": stage,
            "parent": parent,
            "created_by": created_by,
            "created_at": datetime.now(UTC),
            "trusted_types": list(trusted_types or []),
        }
        if artifact is not None and framework != "http":
            copied = staging / ("model" + artifact.suffix)
            shutil.copyfile(artifact, copied)
            # Hash and inspect the copy: it is what will be served, whatever the source does.
            fields["artifact"] = copied.name
            fields["sha256"] = sha256_file(copied)
            fields["inputs"], fields["outputs"] = _signature(framework, copied, trusted_types or [])
        try:
            manifest = Manifest.model_validate(fields)
        except ValueError as exc:
            raise ManifestError(f"model.yaml for {model}/{version}: {exc}") from None
        dump_manifest(manifest, staging / MANIFEST_NAME)
        staging.chmod(0o755)  # mkdtemp makes it 0700; servers may run as another user
        (root / model).mkdir(exist_ok=True)
        if target.exists():
            raise FileExistsError(f"{target}: version appeared while it was being added")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# --- signatures: what inputs and outputs an artifact declares --------------------------

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


def _signature(
    framework: Framework, path: Path, trusted: list[str]
) -> tuple[list[_Tensor], list[_Tensor]]:
    if framework == "onnx":
        return _onnx_signature(path)
    if framework == "sklearn":
        return _sklearn_signature(path, trusted)
    return _torch_signature(path)


def _onnx_signature(path: Path) -> tuple[list[_Tensor], list[_Tensor]]:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors share no public base class
        raise ArtifactError(f"{path.name}: ONNX Runtime cannot load it: {exc}") from None

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

        estimator = joblib.load(path)  # a pickle: only add files you would serve anyway
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
