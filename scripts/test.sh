#!/usr/bin/env bash
# Install rollguard with its test tools into .venv and run lint, types and the test suite.
# README's second command and .ci/run both call exactly this script.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch is pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,torch]' 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -m pip check >/dev/null || { .venv/bin/python -m pip check; exit 1; }

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$status"
