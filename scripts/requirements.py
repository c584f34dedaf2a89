"""Print rollguard's requirements for the given extras, one a line (the image's deps layer).

Usage: python scripts/requirements.py [pyproject.toml] [EXTRA,EXTRA...]
Self-references such as `rollguard[onnx,sklearn]` are expanded, so the list installs
without rollguard's own source.
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(project: dict[str, object], extras: list[str]) -> list[str]:
    name = str(project["name"])
    optional = project.get("optional-dependencies", {})
    assert isinstance(optional, dict)
    found: list[str] = list(project["dependencies"])  # type: ignore[call-overload]
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; known: {', '.join(sorted(optional))}")
        seen.add(extra)
        for requirement in optional[extra]:
            self_ref = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", requirement.strip())
            if self_ref:
                pending += [e.strip() for e in self_ref.group(1).split(",")]
            elif requirement not in found:
                found.append(requirement)
    return found


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"
    wanted = [e for e in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if e]
    with open(path, "rb") as file:
        print("\n".join(requirements(tomllib.load(file)["project"], wanted)))
