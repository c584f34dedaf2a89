"""`framework: grpc` manifests: the endpoint forms taken, and what is refused."""

from __future__ import annotations

from typing import Any

import pytest

from rollguard.serving.errors import ManifestError
from rollguard.serving.manifest import grpc_target, parse_manifest


def _manifest(**fields: Any) -> dict[str, Any]:
    return {"name": "m", "version": "1", "framework": "grpc"} | fields


@pytest.mark.parametrize(
    ("endpoint", "target"),
    [
        ("grpc://10.0.0.5:8001", "10.0.0.5:8001"),
        ("triton.internal:8001", "triton.internal:8001"),
        ("grpc://[::1]:9000/", "[::1]:9000"),
    ],
)
def test_endpoint_forms(endpoint: str, target: str) -> None:
    assert grpc_target(endpoint) == target
    manifest = parse_manifest(_manifest(endpoint=endpoint), "model.yaml")
    assert manifest.framework == "grpc" and manifest.artifact is None


@pytest.mark.parametrize(
    "endpoint",
    ["http://host:8001", "host", "host:port", "host:0", "grpc://host:8001/v2/models/m", "h st:1"],
)
def test_endpoints_that_are_not_grpc_addresses_are_refused(endpoint: str) -> None:
    with pytest.raises(ManifestError, match="is not a gRPC address"):
        parse_manifest(_manifest(endpoint=endpoint), "model.yaml")


def test_an_endpoint_is_required_and_upstream_names_are_for_grpc_only() -> None:
    with pytest.raises(ManifestError, match="framework 'grpc' needs 'endpoint'"):
        parse_manifest(_manifest(), "model.yaml")
    upstream = {"model": "fraud", "version": "2"}
    parse_manifest(_manifest(endpoint="h:1", upstream=upstream), "model.yaml")
    http = _manifest(framework="http", endpoint="http://h:1/v2/models/m", upstream=upstream)
    with pytest.raises(ManifestError, match="name a framework grpc upstream's model"):
        parse_manifest(http, "model.yaml")
    with pytest.raises(ManifestError, match="isolation 'process' is for local models"):
        parse_manifest(_manifest(endpoint="h:1", runtime={"isolation": "process"}), "m.yaml")
