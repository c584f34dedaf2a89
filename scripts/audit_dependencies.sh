#!/usr/bin/env bash
# Audit the packages installed in .venv against published advisories with pip-audit.
# Fails on any known vulnerability. pip-audit itself exits 0 when its vulnerability
# service cannot be reached (every package "could not be audited"), so this script reads
# its JSON and says how many packages were really checked; with STRICT=1 an audit that
# checked nothing fails too.
set -euo pipefail
cd "$(dirname "$0")/.."

AUDIT_VENV=${AUDIT_VENV:-.venv-audit}
if [ ! -x "$AUDIT_VENV/bin/pip-audit" ]; then
    python3 -m venv "$AUDIT_VENV"
    "$AUDIT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'pip-audit>=2.7' 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
report=$(mktemp)
trap 'rm -f "$report"' EXIT
"$AUDIT_VENV/bin/pip-audit" --path "$site" --format json --progress-spinner off >"$report" 2>/dev/null || true
python3 - "$report" <<'PY'
import json
import os
import sys

data = json.load(open(sys.argv[1]))
packages = data.get("dependencies", data) if isinstance(data, dict) else data
checked = [p for p in packages if "skip_reason" not in p]
skipped = [p for p in packages if "skip_reason" in p]
vulnerable = [p for p in checked if p.get("vulns")]
for p in vulnerable:
    for v in p["vulns"]:
        fixed = ", ".join(v.get("fix_versions", [])) or "no fix"
        print(f"VULNERABLE {p['name']} {p['version']}: {v['id']} (fixed in {fixed})")
print(f"pip-audit: {len(checked)} packages checked, {len(vulnerable)} vulnerable, "
      f"{len(skipped)} could not be audited")
if skipped and not checked:
    print("pip-audit could not reach its vulnerability service: nothing was audited")
    sys.exit(1 if os.environ.get("STRICT") == "1" else 0)
sys.exit(1 if vulnerable else 0)
PY
