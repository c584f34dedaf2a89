"""README's first command: `rollguard demo`, the real CLI on a fresh work directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_demo_rolls_the_faulty_candidate_back_and_promotes_the_good_one(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rollguard.proxy.cli", "demo", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=380,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    faulty, good = out.split("== a good candidate", 1)
    assert "-> rolled back: rollback: error_rate" in faulty
    assert "-> promoted:" in good
    assert "chain intact" in out
    assert "demo finished in" in out and out.rstrip().endswith("ok")
