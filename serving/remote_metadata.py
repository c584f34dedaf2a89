"""An http upstream's declared tensors, read from its V2 model metadata for `registry add`.

`GET <endpoint>` (the V2 model URL, `.../v2/models/{m}[/versions/{v}]`) answers
`{"name", "versions", "platform", "inputs": [...], "outputs": [...]}`. Triton and
KServe fill `inputs`/`outputs` ({name, datatype, shape}); MLServer leaves them empty
unless its model-settings declare them. Used once, by the CLI, so a plain blocking
urllib call does.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from pydantic import ValidationError

from rollguard.serving.errors import ArtifactError
from rollguard.serving.manifest import TensorField

MAX_METADATA_BYTES = 4 * 1024 * 1024


def upstream_signature(
    endpoint: str, timeout_s: float = 10.0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) the upstream declares, each list empty when it declares none;
    ArtifactError naming the URL when it cannot be read or does not hold."""
    url = endpoint.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ArtifactError(f"endpoint {endpoint!r} is not an http(s) URL")
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read(MAX_METADATA_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise ArtifactError(f"{url}: model metadata answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ArtifactError(f"{url}: cannot read model metadata: {reason}") from None
    if len(raw) > MAX_METADATA_BYTES:
        raise ArtifactError(f"{url}: model metadata larger than {MAX_METADATA_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ArtifactError(f"{url}: model metadata is not JSON") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{url}: model metadata is not a JSON object")
    return _tensors(doc, "inputs", url), _tensors(doc, "outputs", url)


def _tensors(doc: dict[str, Any], key: str, url: str) -> list[dict[str, Any]]:
    found = doc.get(key) or []
    if not isinstance(found, list):
        raise ArtifactError(f"{url}: model metadata '{key}' is not a list")
    tensors = []
    for i, item in enumerate(found):
        if not isinstance(item, dict):
            raise ArtifactError(f"{url}: model metadata {key}[{i}] is not an object")
        try:
            field = TensorField.model_validate(
                {k: item.get(k) for k in ("name", "datatype", "shape")}
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ArtifactError(
                f"{url}: model metadata {key}[{i}].{where}: {first['msg']}"
            ) from None
        tensors.append(field.model_dump(exclude_none=True))
    return tensors


def upstream_grpc_signature(
    endpoint: str, model: str, version: str | None = None, timeout_s: float = 10.0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) a `framework: grpc` upstream declares for `model` (and `version`,
    when given) in its V2 gRPC `ModelMetadata`; ArtifactError naming the address when it
    cannot be read or does not hold."""
    import grpc

    from rollguard.serving.manifest import grpc_target
    from rollguard.serving.v2grpc import SERVICE, pb

    try:
        target = grpc_target(endpoint)
    except ValueError as exc:
        raise ArtifactError(str(exc)) from None
    request = pb.ModelMetadataRequest(name=model, version=version or "")
    where = f"{target} model {model!r}" + (f" version {version!r}" if version else "")
    options = [("grpc.max_receive_message_length", MAX_METADATA_BYTES)]
    with grpc.insecure_channel(target, options=options) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, pb.ModelMetadataResponse]
        call = channel.unary_unary(
            f"/{SERVICE}/ModelMetadata",
            request_serializer=None,
            response_deserializer=pb.ModelMetadataResponse.FromString,
        )
        try:
            answer = call(request.SerializeToString(), timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            name = code.name if code is not None else "error"
            raise ArtifactError(f"{where}: model metadata answered {name}: {detail}") from None
    doc = {
        key: [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
            for t in getattr(answer, key)
        ]
        for key in ("inputs", "outputs")
    }
    return _tensors(doc, "inputs", where), _tensors(doc, "outputs", where)
