"""Regenerate the V2 gRPC modules in serving/v2grpc/ from grpc_predict_v2.proto.

    .venv/bin/python scripts/gen_grpc.py [--out DIR]

Runs grpcio-tools' protoc (the version pinned in pyproject's dev extra) for the message
module and its type stub, then makes one change: the messages are
built in a descriptor pool of their own instead of protobuf's process-wide default one.
The V2 API's messages are named `inference.*` by every implementation (Triton's
`tritonclient.grpc` included), and two files defining the same names in the default pool
cannot both be imported into one process ("duplicate symbol"). The wire only carries the
method path and field numbers, so a private pool changes nothing a peer sees.

No service module (`--grpc_python_out`) is generated: the gateway's gRPC port and the
gRPC runner register and call the methods by path with their own (de)serialisers
(serving/v2grpc/__init__.py), so that a message that does not parse is the client's
INVALID_ARGUMENT rather than grpc's logged INTERNAL, and a request is serialised when
the runner says.

tests/serving/test_v2grpc_codegen.py runs this into a temporary directory and compares.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "rollguard/serving/v2grpc/grpc_predict_v2.proto"  # as imported: rollguard.serving...
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = "DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile("


def generate(out: Path) -> list[Path]:
    """Write the generated files under `out` (same relative paths as in the repository)."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "protoc",
            f"-I{ROOT}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            str(ROOT / PROTO),
        ]
    )
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    folder = out / Path(PROTO).parent
    messages = folder / "grpc_predict_v2_pb2.py"
    text = messages.read_text(encoding="utf-8")
    if text.count(DEFAULT_POOL) != 1:
        raise SystemExit(f"{messages}: expected one {DEFAULT_POOL!r} line to change")
    messages.write_text(text.replace(DEFAULT_POOL, OWN_POOL), encoding="utf-8")
    return sorted(folder.glob("grpc_predict_v2_pb2*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
