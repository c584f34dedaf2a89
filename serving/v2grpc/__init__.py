"""The Open Inference Protocol's gRPC API (KServe's `grpc_predict_v2.proto`).

`pb` is the message module generated from grpc_predict_v2.proto by scripts/gen_grpc.py
(typed by its `.pyi`). The service's methods are called and served by path, with
serialisation in our hands (`method`; proxy/grpc_endpoints.py registers the server side).
"""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.protobuf.message import Message as _Message

from rollguard.serving.v2grpc import grpc_predict_v2_pb2 as pb

__all__ = ["METHODS", "SERVICE", "method", "pb"]

SERVICE = "inference.GRPCInferenceService"
METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStatistics",  # Triton's statistics extension
)
Message = TypeVar("Message", bound=_Message)


def method(
    channel: grpc.aio.Channel, name: str, response: type[Message]
) -> grpc.aio.UnaryUnaryMultiCallable[bytes, Message]:
    """The service's method `name` on `channel`: it takes a request already serialised
    (the caller decides when the bytes are made) and answers a `response` message."""
    return channel.unary_unary(
        f"/{SERVICE}/{name}",
        request_serializer=None,
        response_deserializer=response.FromString,
    )
