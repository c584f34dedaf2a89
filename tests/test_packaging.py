"""The installed distribution: exactly one top-level import name, `rollguard`."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_TOP_LEVEL = """
import importlib.metadata as md, json
names = md.packages_distributions().items()
print(json.dumps(sorted(n for n, dists in names if "rollguard" in dists)))
"""


@pytest.mark.slow
def test_a_fresh_install_has_only_rollguard_at_the_top_level(tmp_path: Path) -> None:
    """`pip install .` into a fresh venv (dependencies left out: they are the index's, not
    ours): the distribution's only top-level name is `rollguard`, with every subpackage
    and the policy schema inside it, and `import proxy` fails there."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(REPO)],
        check=True, cwd=tmp_path, capture_output=True,
    )  # fmt: skip
    [wheel] = wheels.glob("rollguard-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"rollguard"}
    for module in ("proxy/gateway.py", "serving/registry.py", "policy/rollout.schema.json",
                   "proxy/ui/index.html", "proxy/ui/app.js", "proxy/ui/app.css"):  # fmt: skip
        assert f"rollguard/{module}" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True, cwd=tmp_path, capture_output=True,
    )  # fmt: skip
    found = subprocess.run(
        [python, "-c", _TOP_LEVEL], check=True, cwd=tmp_path, capture_output=True, text=True
    )
    assert json.loads(found.stdout) == ["rollguard"]
    for name in ("proxy", "serving", "policy"):
        missing = subprocess.run(
            [python, "-c", f"import {name}"], cwd=tmp_path, capture_output=True
        )
        assert missing.returncode != 0, f"`import {name}` worked in the fresh venv"
    subprocess.run([python, "-c", "import rollguard"], check=True, cwd=tmp_path)
