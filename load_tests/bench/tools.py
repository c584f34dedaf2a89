"""Finding (and on Debian, installing) the external programs: wrk, nginx."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tool:
    """A program found on PATH, or why it could not be had."""

    name: str
    path: str | None
    reason: str = ""

    def version(self) -> str:
        if self.path is None:
            return "missing"
        flag = "-v" if self.name == "nginx" else "--version"
        try:
            done = subprocess.run(
                [self.path, flag], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[0].split(" Copyright")[0] if text else "unknown"


_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))


def _apt_install(package: str) -> str:
    """Install with apt-get (root only); '' on success, else the reason."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine: install it with your package manager"
    if os.geteuid() != 0:
        return f"not root: run `sudo apt-get install -y {package}`"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", package]
    for attempt in range(2):
        done = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
        if done.returncode == 0:
            return ""
        if attempt == 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, check=False)
    tail = (done.stderr or done.stdout).strip().splitlines()
    return f"apt-get install {package} failed: {tail[-1] if tail else done.returncode}"


def locate(name: str, package: str, *, install: bool = True) -> Tool:
    """`name` on PATH; otherwise installed from Debian's `package` when allowed and possible."""
    path = _which(name)
    if path is not None:
        return Tool(name, path)
    if not install:
        return Tool(name, None, f"{name} is not installed (and --no-install was given)")
    print(f"installing {package} with apt-get ...", flush=True)
    reason = _apt_install(package)
    path = _which(name)
    if path is None:
        return Tool(name, None, reason or f"{package} installed but {name} is not on PATH")
    return Tool(name, path)
