"""Which operators an ONNX model uses, read from its protobuf bytes (no `onnx` package).

Scheduling asks it one question: can a call's cost depend on the values of its inputs?
Control flow (a `Loop` whose trip count is an input, an `If`, a `Scan`) and operators
whose output size is read from a tensor's values (`Range`, `Tile`, `Expand`, `NonZero`,
`Resize`, ...) can make one input cost microseconds and another minutes; a graph
without them costs what its input shapes say. Only the wire format is read: ModelProto
`graph` (7) and `functions` (25); GraphProto `node` (1); NodeProto `op_type` (4),
`domain` (7) and `attribute` (5); AttributeProto `g` (6) and `graphs` (11), so
subgraphs count too. Initializers and other fields are skipped by their length.
"""

from __future__ import annotations

from collections.abc import Iterator

# Operators whose cost can follow their inputs' values rather than their shapes.
VALUE_DEPENDENT = frozenset(
    {
        "Loop", "If", "Scan", "SequenceMap",  # control flow
        "NonZero", "Range", "Tile", "Expand", "ConstantOfShape", "Resize", "Upsample",
        "OneHot", "Compress", "Unique", "NonMaxSuppression", "TopK", "Pad", "StringSplit",
        "CenterCropPad", "Col2Im", "RoiAlign", "MaxRoiPool",
    }
)  # fmt: skip
# Domains whose operators ONNX Runtime implements itself; any other is a custom operator.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class NotOnnx(ValueError):
    """The bytes are not a protobuf message of the shape an ONNX model has."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise NotOnnx("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """(field number, wire type, value) of one message; length-delimited values as views."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == _LEN:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise NotOnnx("a field runs past the end")
            yield number, wire, data[pos : pos + size]
            pos += size
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        else:
            raise NotOnnx(f"wire type {wire}")


def _nodes(graph: memoryview) -> Iterator[tuple[str, str]]:
    """(domain, op_type) of every node of a graph and its subgraphs."""
    for number, wire, value in _fields(graph):
        if number == 1 and wire == _LEN:
            assert isinstance(value, memoryview)
            yield from _node(value)


def _node(node: memoryview) -> Iterator[tuple[str, str]]:
    op_type = domain = ""
    for number, wire, value in _fields(node):
        if wire != _LEN:
            continue
        assert isinstance(value, memoryview)
        if number == 4:
            op_type = bytes(value).decode("utf-8", "replace")
        elif number == 7:
            domain = bytes(value).decode("utf-8", "replace")
        elif number == 5:
            for a_number, a_wire, a_value in _fields(value):
                if a_number in (6, 11) and a_wire == _LEN:
                    assert isinstance(a_value, memoryview)
                    yield from _nodes(a_value)
    yield domain, op_type


def operators(model: bytes) -> set[tuple[str, str]]:
    """Every (domain, op_type) the model's graph, subgraphs and local functions use."""
    found: set[tuple[str, str]] = set()
    for number, wire, value in _fields(memoryview(model)):
        if wire != _LEN:
            continue
        assert isinstance(value, memoryview)
        if number == 7:
            found.update(_nodes(value))
        elif number == 25:  # FunctionProto: its nodes are field 7
            for f_number, f_wire, f_value in _fields(value):
                if f_number == 7 and f_wire == _LEN:
                    assert isinstance(f_value, memoryview)
                    found.update(_node(f_value))
    return found


def value_dependent_operators(model: bytes) -> list[str]:
    """The operators that can make the model's cost depend on input values (sorted);
    empty when its cost follows input shapes only. NotOnnx for bytes that do not parse."""
    found = operators(model)
    if not found:
        raise NotOnnx("no graph nodes found")
    return sorted(
        f"{domain}:{op}" if domain not in ("", "ai.onnx") else op
        for domain, op in found
        if op in VALUE_DEPENDENT or domain not in KNOWN_DOMAINS
    )
