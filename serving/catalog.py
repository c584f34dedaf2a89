"""Registry directory operations without loading models: walk, verify, show, add.

These are the file operations behind `rollguard registry list|show|verify|add`; the
Registry uses the same walk and the same verification before it loads anything.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from rollguard.serving.errors import (
    ArtifactError,
    ManifestError,
    ModelNotFound,
    ServingError,
    VersionNotFound,
)
from rollguard.serving.hashing import PinnedBytes, read_file, sha256_file
from rollguard.serving.manifest import (
    ARTIFACT_SUFFIXES,
    MANIFEST_NAME,
    Framework,
    Manifest,
    Stage,
    dump_manifest,
    manifest_from_bytes,
)
from rollguard.serving.remote_metadata import upstream_grpc_signature, upstream_signature
from rollguard.serving.signatures import onnx_external_files, read_signature

log = logging.getLogger(__name__)
Status = Literal["ok", "refused"]
# (file name, st_dev, st_ino, st_size, st_mtime_ns) of every visible file, sorted.
Fingerprint = tuple[tuple[str, int, int, int, int], ...]


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
        if not _text_name(entry.path):
            continue
        try:
            if not entry.name.startswith(".") and entry.is_dir():
                found.append(Path(entry.path))
        except OSError:  # vanished or dangling while we looked
            continue
    return sorted(found)


_WARNED: set[str] = set()


def _text_name(path: str) -> bool:
    """Whether a file name is UTF-8 text. One that is not could go into no metric label,
    log line or JSON answer (surrogates): the directory is passed over, said once."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", errors="replace")
        if shown not in _WARNED:
            _WARNED.add(shown)
            log.warning("registry: %s is passed over: its name is not UTF-8 text", shown)
        return False
    return True


def version_directories(root: Path) -> list[tuple[str, str, Path]]:
    """Every root/<model>/<version> directory as (model, version, path)."""
    return [
        (model_dir.name, version_dir.name, version_dir)
        for model_dir in subdirectories(root)
        for version_dir in subdirectories(model_dir)
    ]


def fingerprint(directory: Path) -> Fingerprint:
    """What a version directory holds now, cheaply: a scan looks again where it changed."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return ()
    found = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            st = os.stat(entry.path)  # follows symlinks: ConfigMap files link into ..data
        except OSError:
            continue
        found.append((entry.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(sorted(found))


def scan_versions(root: Path) -> dict[tuple[str, str], tuple[Path, Fingerprint]] | None:
    """Every version directory by (model, version) with its fingerprint; None when the
    root is missing."""
    if not root.is_dir():
        return None
    return {(m, v): (d, fingerprint(d)) for m, v, d in version_directories(root)}


def read_manifest(directory: Path, model: str, version: str) -> Manifest:
    """The version's model.yaml once it validates and names its directories;
    ManifestError naming the file otherwise."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ManifestError(f"{manifest_path}: missing")
    try:
        raw = read_file(directory, MANIFEST_NAME)
    except ArtifactError as exc:
        raise ManifestError(str(exc)) from None
    manifest = manifest_from_bytes(raw, str(manifest_path))
    for field, value, expected in (
        ("name", manifest.name, model),
        ("version", manifest.version, version),
    ):
        if value != expected:
            raise ManifestError(
                f"{manifest_path}: {field} {value!r} does not match its directory {expected!r}"
            )
    return manifest


def read_version(directory: Path, model: str, version: str) -> tuple[Manifest, PinnedBytes]:
    """The version's manifest and the bytes of every file it pins, each read once and
    checked against its sha256 (serving/hashing.py); ManifestError / ArtifactError
    naming the file otherwise. Blocking (reads whole files): call it off the event loop."""
    manifest = read_manifest(directory, model, version)
    return manifest, PinnedBytes.read(directory, manifest)


def verify_directory(directory: Path, model: str, version: str) -> Manifest:
    """`read_version` without keeping the bytes: what `registry verify` checks."""
    return read_version(directory, model, version)[0]


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
            partial: Manifest | None = read_manifest(directory, model, version)
        except ServingError:
            partial = None
        return VersionInfo(model, version, directory, "refused", str(exc), partial)
    return VersionInfo(model, version, directory, "ok", None, manifest)


def list_versions(root: Path) -> list[VersionInfo]:
    """Every version under root, verified (manifest and sha256) but not loaded."""
    return [check() for check in version_checks(root)]


def version_checks(root: Path) -> list[Callable[[], VersionInfo]]:
    """One call per version under root, in order, each verifying it when called: what a
    caller showing progress runs one at a time (hashing large artifacts takes a while)."""
    found = version_directories(root)
    found.sort(key=lambda item: (item[0], version_key(item[1])))
    return [functools.partial(_inspect, model, version, d) for model, version, d in found]


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
    inputs: list[dict[str, Any]] | None = None,
    outputs: list[dict[str, Any]] | None = None,
    trust_pickle: bool = False,
    reference: Path | None = None,
    upstream_model: str | None = None,
    upstream_version: str | None = None,
) -> Path:
    """Copy an artifact into root/model/version with a model.yaml; returns the directory.

    Inputs and outputs are `inputs`/`outputs` when given, otherwise read from the
    artifact where its format states them without running it (ONNX graph, skops), or,
    for a pickle, only when `trust_pickle` says the caller would serve the file anyway;
    else left empty with a warning. `trusted_types` are skops types the caller vouches
    for (never guessed). An ONNX model's external data files (found with the `onnx`
    package) and `reference` (a .npy/.npz drift sample) are copied too and pinned by
    their sha256 in `files`. For `framework="http"` pass `endpoint`, no artifact: the
    inputs and outputs not given are read from the upstream's V2 model metadata; the same
    for `framework="grpc"` (`endpoint` grpc://host:port or host:port; `upstream_model` and
    `upstream_version` the upstream's names, when they differ from ours), read with the
    V2 gRPC `ModelMetadata` call.
    The version is assembled under a hidden name in root and renamed into place, so a
    watching registry never sees it half-copied; an existing version is never
    overwritten (FileExistsError).
    """
    if framework is None:
        if artifact is None:
            if not endpoint:
                raise ArtifactError("give an artifact file, or an endpoint for framework http")
            framework = "grpc" if endpoint.startswith("grpc://") else "http"
        else:
            framework = infer_framework(artifact)
    target = root / model / version
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target}: version already exists; versions are never overwritten")
    remote = framework in ("http", "grpc")
    if remote and not endpoint:
        raise ArtifactError(f"framework {framework} needs --endpoint (the upstream's address)")
    if not remote and (artifact is None or not artifact.is_file()):
        raise ArtifactError(f"{artifact}: no such file")
    if reference is not None and reference.suffix not in (".npy", ".npz"):
        raise ArtifactError(f"{reference}: a reference sample is a .npy or .npz file")
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
            "files": [],
        }
        if upstream_model or upstream_version:
            if framework != "grpc":
                raise ArtifactError(
                    "--upstream-model and --upstream-version are for framework grpc"
                )
            upstream = {"model": upstream_model, "version": upstream_version}
            fields["upstream"] = {k: v for k, v in upstream.items() if v}
        if artifact is not None and not remote:
            copied = staging / ("model" + artifact.suffix)
            shutil.copyfile(artifact, copied)
            # Hash and inspect the copies: they are what will be served, whatever the
            # sources do meanwhile.
            fields["artifact"] = copied.name
            fields["sha256"] = sha256_file(copied)
            if framework == "onnx":
                for name in onnx_external_files(copied):
                    shutil.copyfile(artifact.parent / name, staging / name)
                    fields["files"].append({"path": name, "sha256": sha256_file(staging / name)})
            if inputs is None or outputs is None:
                found = read_signature(
                    framework, copied, trusted_types or [], trust_pickle=trust_pickle
                )
                inputs = found[0] if inputs is None else inputs
                outputs = found[1] if outputs is None else outputs
        if framework == "http" and endpoint and (inputs is None or outputs is None):
            declared = upstream_signature(endpoint)  # what the upstream says it takes
            inputs = declared[0] if inputs is None else inputs
            outputs = declared[1] if outputs is None else outputs
        if framework == "grpc" and endpoint and (inputs is None or outputs is None):
            declared = upstream_grpc_signature(endpoint, upstream_model or model, upstream_version)
            inputs = declared[0] if inputs is None else inputs
            outputs = declared[1] if outputs is None else outputs
        fields["inputs"], fields["outputs"] = inputs or [], outputs or []
        if reference is not None:
            name = "reference" + reference.suffix
            shutil.copyfile(reference, staging / name)
            fields["reference"] = name
            fields["files"].append({"path": name, "sha256": sha256_file(staging / name)})
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
