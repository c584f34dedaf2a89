"""The committed V2 gRPC message module is what scripts/gen_grpc.py makes from the proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDER = Path("rollguard/serving/v2grpc")


def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_grpc.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    made = sorted(p.name for p in (tmp_path / FOLDER).iterdir())
    assert made == ["grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi"]
    for name in made:
        committed = (ROOT / FOLDER / name).read_bytes()
        assert (tmp_path / FOLDER / name).read_bytes() == committed, (
            f"{FOLDER / name} differs from what scripts/gen_grpc.py makes: regenerate it"
        )


def test_the_messages_live_beside_tritonclients_own() -> None:
    """Both define `inference.*` messages; ours are in a pool of their own, so a process
    can import both (tritonclient's in the default pool would clash with ours there)."""
    code = (
        "import tritonclient.grpc.service_pb2 as theirs\n"
        "from rollguard.serving.v2grpc import pb\n"
        "m = pb.ModelInferRequest(model_name='m', id='x')\n"
        "assert theirs.ModelInferRequest.FromString(m.SerializeToString()).id == 'x'\n"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, cwd=ROOT)
