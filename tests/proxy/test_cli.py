"""The `rollguard` command line on real files and a real running gateway."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from rollguard.proxy.cli import main
from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import serve

GOOD = Path(__file__).resolve().parents[2] / "config" / "policies" / "fraud-canary.yaml"


def test_policy_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(GOOD)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.read_text().replace("strategy: canary", "strategy: rainbow"))
    assert main(["policy", "check", str(GOOD), str(bad)]) == 1
    err = capsys.readouterr().err
    line = int(err.split("bad.yaml:")[1].split(":")[0])
    assert "rainbow" in bad.read_text().splitlines()[line - 1]
    assert "spec.strategy" in err


def test_registry_list_verify_show_add(
    tmp_path: Path, demo_registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "registry"
    shutil.copytree(demo_registry / "fraud-onnx", root / "fraud-onnx")
    assert main(["registry", "--registry", str(root), "verify"]) == 0
    assert "fraud-onnx/1.0.0\tonnx\tproduction\tok" in capsys.readouterr().out
    assert main(["registry", "--registry", str(root), "show", "fraud-onnx", "1.1.0"]) == 0
    assert json.loads(capsys.readouterr().out)["manifest"]["version"] == "1.1.0"
    artifact = demo_registry / "fraud-onnx" / "1.1.0" / "model.onnx"
    code = main(
        [
            "registry",
            "--registry",
            str(root),
            "add",
            str(artifact),
            "--model",
            "new",
            "--version",
            "2",
        ]
    )
    assert code == 0
    added = (root / "new" / "2" / "model.yaml").read_text()
    assert "framework: onnx" in added and "name: input" in added
    (root / "fraud-onnx" / "1.0.0" / "model.onnx").write_bytes(b"tampered")
    capsys.readouterr()
    assert main(["registry", "--registry", str(root), "verify"]) == 1
    assert "fraud-onnx/1.0.0" in capsys.readouterr().out


async def test_status_actions_and_audit_against_a_running_gateway(
    tmp_path: Path,
    make_registry: MakeRegistry,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fraud.yaml").write_text(GOOD.read_text())
    token = "cli-test-admin-token-0123456789"
    monkeypatch.setenv("ROLLGUARD_ADMIN_TOKEN", token)  # what the CLI sends
    async with serve(tmp_path, registry, policies=policies, admin_token=token) as server:
        url = ["--url", server.admin_url]  # the CLI talks to the admin port
        assert await asyncio.to_thread(main, ["status", *url]) == 0
        assert "fraud\tfraud\tcanary\tprogressing" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["approve", "fraud", *url, "--actor", "bob"]) == 1
        assert "409" in capsys.readouterr().err  # not awaiting approval: rejected, one line
        assert await asyncio.to_thread(main, ["pause", "fraud", *url, "--actor", "bob"]) == 0
        assert await asyncio.to_thread(main, ["rollback", "fraud", *url, "--actor", "bob"]) == 0
        assert "rolled_back" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["promote", "nope", *url]) == 1
    state = str(tmp_path / "state")
    assert main(["audit", "--state", state, "verify"]) == 0
    assert "chain intact" in capsys.readouterr().out
    assert main(["audit", "--state", state, "export", "--format", "csv"]) == 0
    csv = capsys.readouterr().out
    assert csv.splitlines()[0].startswith("seq,ts,kind") and "bob" in csv
    log = tmp_path / "state" / "audit.jsonl"
    lines = log.read_text().splitlines()
    lines[1] = lines[1].replace("fraud", "fr4ud", 1)
    log.write_text("\n".join(lines) + "\n")
    assert main(["audit", "--state", state, "verify"]) == 1
    assert "line 2" in capsys.readouterr().err
