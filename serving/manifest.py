"""The model.yaml manifest of one registry version: parsed and validated once, then frozen."""

from __future__ import annotations

import re
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rollguard.serving.errors import ManifestError
from rollguard.serving.features import Feature, check_declaration
from rollguard.serving.prediction import DEFAULT_RULE, Read, Rule
from rollguard.serving.tensors import V2_TO_NUMPY, TensorSpec

MANIFEST_NAME = "model.yaml"
Framework = Literal["onnx", "torch", "sklearn", "http", "grpc"]
REMOTE = frozenset({"http", "grpc"})  # frameworks answered by an upstream server
Stage = Literal["development", "staging", "production", "archived"]
ARTIFACT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "onnx": (".onnx",),
    "torch": (".pt", ".pt2"),
    "sklearn": (".skops", ".joblib"),
}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorField(_Frozen):
    name: str = Field(min_length=1)
    datatype: str
    shape: list[int] = Field(min_length=1)

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        if value not in V2_TO_NUMPY:
            raise ValueError(f"unknown datatype {value!r}; expected one of {sorted(V2_TO_NUMPY)}")
        return value

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in value):
            raise ValueError(f"shape {value}: dimensions are positive or -1")
        return value

    # Per-column schema checked on /predict rows (serving/features.py).
    features: list[Feature] | None = None

    @model_validator(mode="after")
    def _features_fit(self) -> TensorField:
        if self.features is not None:
            check_declaration(self.features, self.datatype, self.shape)
        return self

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.datatype, tuple(self.shape))


def plain_file_name(value: str, what: str) -> str:
    """`value` when it names a file directly in the version directory: no `/`, no `..`,
    no hidden name (a scan skips hidden names, so their changes would go unseen)."""
    if not value or "/" in value or "\\" in value or value.startswith(".") or "\0" in value:
        raise ValueError(f"{what} {value!r} must be a plain file name in the version directory")
    return value


class PinnedFile(_Frozen):
    """One more file a version loads (ONNX external data, the drift `reference`), pinned
    by its own sha256 as the artifact is."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _plain(cls, value: str) -> str:
        return plain_file_name(value, "files: path")


class Batching(_Frozen):
    max_batch_size: int = Field(ge=1, le=65536)
    max_delay_ms: float = Field(ge=0, le=10_000)
    # Batches computing at once (default: the CPU count). Fewer makes fuller batches.
    max_concurrent_batches: int | None = Field(default=None, ge=1, le=256)


class PredictionField(_Frozen):
    """Which output holds the prediction and how to read it (serving/prediction.py)."""

    output: str = Field(min_length=1)
    read: Read = "label"
    threshold: float | None = None
    classes: list[str | int] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _fits_read(self) -> PredictionField:
        if (self.threshold is None) == (self.read == "threshold"):
            raise ValueError("'threshold' is given with read: threshold, and only then")
        if self.classes is not None:
            if self.read not in ("argmax", "threshold"):
                raise ValueError(f"'classes' names argmax or threshold indexes, not {self.read}")
            if self.read == "threshold" and len(self.classes) != 2:
                raise ValueError("read: threshold takes two 'classes' (below, at or above)")
        return self

    def rule(self) -> Rule:
        return Rule(self.output, self.read, self.threshold, self.classes)


class UpstreamOptions(_Frozen):
    """How an `http` or `grpc` version's upstream is spoken to (serving/runners/)."""

    # grpc: the upstream's name for the model (default: this manifest's `name`) and the
    # version to ask for (default: none, the upstream picks).
    model: str | None = Field(default=None, min_length=1)
    version: str | None = Field(default=None, min_length=1)
    # false: binary tensor requests are sent as JSON (MLServer 1.7.1 takes no binary)
    binary_tensors: bool = True
    # header -> environment variable holding its value (a token for the upstream, ...)
    headers_from_env: dict[str, str] = Field(default_factory=dict)
    # Followed after load (serving/health.py): ready probes, and outlier ejection.
    probe_interval_s: float = Field(default=5.0, gt=0, le=3600)
    unready_after: int = Field(default=2, ge=1, le=100)  # failed probes in a row
    eject_after: int = Field(default=5, ge=1, le=10_000)  # failed calls in a row
    eject_base_s: float = Field(default=30.0, gt=0, le=3600)  # doubled per ejection in a row
    eject_max_s: float = Field(default=300.0, gt=0, le=86_400)

    @field_validator("headers_from_env")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, variable in value.items():
            if not re.fullmatch(r"[A-Za-z0-9-]+", name) or name.lower() in _OWN_HEADERS:
                raise ValueError(f"header {name!r} cannot be set here")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", variable):
                raise ValueError(f"{variable!r} is not an environment variable name")
        return value


_OWN_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection",
     "inference-header-content-length"}
)  # fmt: skip


class Manifest(_Frozen):
    """Everything model.yaml may say about one version."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    framework: Framework
    artifact: str | None = None
    endpoint: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    stage: Stage = "development"
    parent: str | None = None
    inputs: list[TensorField] = Field(default_factory=list)
    outputs: list[TensorField] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    created_by: str | None = None
    created_at: datetime | None = None
    batching: Batching | None = None
    reference: str | None = None  # must also be listed in `files`
    # Every file the version reads besides the artifact and model.yaml, with its sha256.
    files: list[PinnedFile] = Field(default_factory=list)
    # skops: extra type names the artifact may contain, on top of skops' own safe list.
    trusted_types: list[str] = Field(default_factory=list)
    # http: seconds before an upstream call is abandoned.
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    upstream: UpstreamOptions | None = None  # http only
    # Parameters the runner passes to its framework (e.g. intra_op_threads for onnx);
    # `isolation: process` (and `workers: N`) runs a local model in worker processes.
    runtime: dict[str, Any] = Field(default_factory=dict)
    # The output holding the prediction the windows keep, and how to read it.
    prediction: PredictionField | None = None

    @model_validator(mode="after")
    def _prediction_declared(self) -> Manifest:
        wanted = self.prediction.output if self.prediction is not None else None
        if wanted is not None and self.outputs and wanted not in {t.name for t in self.outputs}:
            raise ValueError(
                f"prediction: output {wanted!r} is not among the declared outputs "
                f"{[t.name for t in self.outputs]}"
            )
        return self

    @field_validator("runtime")
    @classmethod
    def _isolation_known(cls, runtime: dict[str, Any]) -> dict[str, Any]:
        # Where a local model runs (serving/isolation.py), read by the registry; the
        # other keys are the frameworks' own.
        isolation = runtime.get("isolation", "thread")
        if isolation not in ("thread", "process"):
            raise ValueError(f"isolation {isolation!r}: expected 'thread' or 'process'")
        workers = runtime.get("workers")
        if workers is None:
            return runtime
        if isolation != "process":
            raise ValueError("workers counts the worker processes of isolation: process")
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
            raise ValueError(f"workers {workers!r}: expected a whole number from 1 to 64")
        return runtime

    @model_validator(mode="after")
    def _isolation_local(self) -> Manifest:
        if self.framework in REMOTE and self.runtime.get("isolation") == "process":
            raise ValueError(
                f"runtime: isolation 'process' is for local models, not framework {self.framework}"
            )
        return self

    @model_validator(mode="after")
    def _files_pinned(self) -> Manifest:
        paths = [f.path for f in self.files]
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise ValueError(f"files: {repeated} listed more than once")
        clash = [p for p in paths if p in (MANIFEST_NAME, self.artifact)]
        if clash:
            raise ValueError(f"files: {clash[0]!r} is model.yaml or the artifact itself")
        if self.reference is not None:
            plain_file_name(self.reference, "reference")
            if self.reference not in paths:
                raise ValueError(
                    f"reference {self.reference!r} is not listed in 'files' with its sha256 "
                    "(every file a version reads is pinned by a hash)"
                )
        return self

    @model_validator(mode="after")
    def _artifact_or_endpoint(self) -> Manifest:
        if (
            self.framework != "grpc"
            and self.upstream is not None
            and (self.upstream.model or self.upstream.version)
        ):
            raise ValueError("upstream: model and version name a framework grpc upstream's model")
        if self.framework == "http":
            if not self.endpoint:
                raise ValueError("framework 'http' needs 'endpoint' (the upstream's V2 model URL)")
            if not self.endpoint.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {self.endpoint!r} is not an http(s) URL")
            return self
        if self.framework == "grpc":
            if not self.endpoint:
                raise ValueError(
                    "framework 'grpc' needs 'endpoint' (the upstream's gRPC address, "
                    "grpc://host:port or host:port)"
                )
            grpc_target(self.endpoint)
            return self
        if not self.artifact:
            raise ValueError(f"framework {self.framework!r} needs 'artifact' (a file name)")
        plain_file_name(self.artifact, "artifact")
        if not self.artifact.endswith(ARTIFACT_SUFFIXES[self.framework]):
            raise ValueError(
                f"artifact {self.artifact!r} does not fit framework {self.framework!r} "
                f"(expected {' or '.join(ARTIFACT_SUFFIXES[self.framework])})"
            )
        if not self.sha256:
            raise ValueError("'sha256' of the artifact is required")
        return self

    # Cached: the gateway checks every request against them.
    @cached_property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(t.spec() for t in self.inputs)

    @cached_property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(t.spec() for t in self.outputs)

    @cached_property
    def prediction_rule(self) -> Rule:
        """How the windows read this version's prediction."""
        return self.prediction.rule() if self.prediction is not None else DEFAULT_RULE

    @cached_property
    def pinned(self) -> dict[str, str]:
        """Every file the version reads besides model.yaml, name -> sha256, artifact first."""
        found = {self.artifact: self.sha256} if self.artifact and self.sha256 else {}
        found.update((f.path, f.sha256) for f in self.files)
        return found


def grpc_target(endpoint: str) -> str:
    """A `framework: grpc` endpoint as the host:port a gRPC channel takes; ValueError
    unless it is `grpc://host:port` or `host:port` (an IPv6 host in brackets)."""
    address = endpoint.removeprefix("grpc://").rstrip("/")
    host, sep, port = address.rpartition(":")
    if (
        not sep
        or not host
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or "/" in host
        or "://" in endpoint.removeprefix("grpc://")
        or any(c.isspace() for c in address)
    ):
        raise ValueError(
            f"endpoint {endpoint!r} is not a gRPC address (grpc://host:port or host:port)"
        )
    return address


def parse_manifest(data: Any, source: str) -> Manifest:
    """Validate already-parsed YAML; errors name `source` and the offending field."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a mapping at the top level")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ManifestError(f"{source}: {where}: {first['msg']}") from None


MAX_MANIFEST_BYTES = 1024 * 1024


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors/aliases: a few hundred bytes of aliases can expand to
    gigabytes when walked, and a manifest has no use for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in model.yaml", event.start_mark
            )
        return super().compose_node(parent, index)


def manifest_from_bytes(raw: bytes, source: str) -> Manifest:
    """Validate model.yaml's bytes; errors name `source`."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{source}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{source}: not UTF-8 text: {exc.reason}") from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass
    except (yaml.YAMLError, RecursionError) as exc:
        raise ManifestError(f"{source}: not valid YAML: {exc}") from None
    return parse_manifest(data, source)


def load_manifest(path: Path) -> Manifest:
    """Read and validate one model.yaml."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror}") from None
    return manifest_from_bytes(raw, str(path))


def dump_manifest(manifest: Manifest, path: Path) -> None:
    """Write a manifest as YAML (used by `registry add` and the demo builder)."""
    data = manifest.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
