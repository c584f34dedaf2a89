"""config/grafana/rollguard-dashboard.json: every PromQL expression in it parses
(promtool) and names only metrics a running rollguard gateway exports (its /metrics,
scraped over loopback)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.proxy.conftest import MakeRegistry
from tests.proxy.support import serve
from tests.serving.support import eventually

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana" / "rollguard-dashboard.json"
POLICY = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: fraud}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "1.1.0"
  key: header:x-user-id
  steps: [{weight: 10}, {weight: 100}]
  checks: [{metric: error_rate, max: 0.01, on_fail: rollback}]
"""
# Grafana's variables, replaced by what they stand for at query time.
VARIABLES = {"$__rate_interval": "1m", "$model": ".*", "$rollout": ".*", "$job": ".*"}
# Sample names per family type, as the text exposition format writes them.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "untyped": ("",),
    "info": ("_info",),
}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
             "and", "or", "unless", "inf", "nan"}  # fmt: skip
_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def expressions(doc: Any) -> Iterator[str]:
    """Every `expr` (panel targets, annotations) and variable query in the dashboard."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            query = key == "query" and isinstance(value, str) and "label_values(" in value
            if query or (key == "expr" and isinstance(value, str)):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from expressions(item)


def substituted(expr: str) -> str:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: the identifiers left once strings,
    label matchers, ranges, grouping clauses, functions and numbers are taken out."""
    label_values = re.fullmatch(r"label_values\((\w+),\s*\w+\)", expr.strip())
    if label_values:
        return {label_values.group(1)}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _CLAUSE.sub(" ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def exported(exposition: str) -> set[str]:
    """Every sample name the exposition's families can have (from their TYPE lines, so a
    family with no samples yet counts too)."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "counter":  # prometheus_client writes a counter's TYPE as NAME_total
                name = name.removesuffix("_total")
            names |= {name + suffix for suffix in SUFFIXES[kind]}
    return names


def test_the_dashboard_is_grafana_json_with_queries() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "rollguard"
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert metric_names(substituted(target["expr"])), target["expr"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'sum by (model, le) (rate(rollguard_request_duration_seconds_bucket{model=~"a|b"}[5m]))'
        ' / on(model) group_left rollguard_x{y="rate(z)"} > bool 0.5 * 1e6'
    )
    assert metric_names(expr) == {"rollguard_request_duration_seconds_bucket", "rollguard_x"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not found: apt-get "
                    "install prometheus (.ci/run installs it)")  # fmt: skip
def test_every_expression_parses_in_promtool(tmp_path: Path) -> None:
    """Each expression as a recording rule: `promtool check rules` parses its PromQL."""
    exprs = [substituted(e) for e in expressions(json.loads(DASHBOARD.read_text()))]
    rules = [{"record": f"grafana:panel_{i}", "expr": e} for i, e in enumerate(exprs)
             if not e.startswith("label_values(")]  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


async def test_every_metric_the_dashboard_names_is_exported(
    tmp_path: Path, make_registry: MakeRegistry
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "fraud.yaml").write_text(POLICY)
    registry = make_registry("fraud/1.0.0", "fraud/1.1.0")
    async with serve(tmp_path, registry, policies=policies) as server:
        await eventually(lambda: server.gateway.router.table("fraud") is not None)
        server.rollouts.tick("fraud")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{server.admin_url}/metrics") as resp,
        ):
            assert resp.status == 200
            names = exported(await resp.text())
    assert "rollguard_candidate_weight_ratio" in names
    wanted = {
        name
        for expr in expressions(json.loads(DASHBOARD.read_text()))
        for name in metric_names(substituted(expr))
    }
    assert len(wanted) >= 20
    assert wanted - names == set()
