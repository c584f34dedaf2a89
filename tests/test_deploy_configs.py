"""What operators copy: config/kubernetes and its fleet overlay config/kubernetes-fleet
(schema-validated), and config/ci (linted, run).

The Kubernetes manifests are validated against the newest Kubernetes schemas that
`kubernetes-validate` ships, strictly (an unknown field fails), and checked against the
Dockerfile and the settings they must agree with. The CI templates are linted
(actionlint) or parsed, and the rollguard commands they run are run here against a
project laid out as they expect, passing on good files and failing on a bad policy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rollguard.proxy.fleet.connection import RedisTarget
from rollguard.proxy.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
KUBE = REPO / "config" / "kubernetes"
FLEET = REPO / "config" / "kubernetes-fleet"
CI = REPO / "config" / "ci"
BIN = Path(sys.executable).parent
POLICY = REPO / "config" / "policies" / "fraud-canary.yaml"


def _tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is in the dev extra: pip install -e '.[dev]'"
    return str(path)


def _manifests() -> list[Path]:
    return sorted(p for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")


def _load(name: str) -> Any:
    return yaml.safe_load((KUBE / name).read_text())


def _validate(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("kubernetes-validate"), "--strict", *map(str, files)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_manifests_validate_against_current_kubernetes(tmp_path: Path) -> None:
    done = _validate(*_manifests())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(_manifests())
    # Strict means strict: a misspelt field fails the same validator.
    typo = tmp_path / "deployment.yaml"
    typo.write_text(
        (KUBE / "deployment.yaml").read_text().replace("readinessProbe", "readinesProbe")
    )
    assert _validate(typo).returncode != 0


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _load("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [p.name for p in _manifests()]


def _image_env() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env_line = text[text.rindex("\nENV ") :].split("\n", 2)[1]
    return dict(pair.split("=", 1) for pair in env_line.split()[1:])


def _containers() -> dict[str, Any]:
    spec = _load("deployment.yaml")["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def test_the_sidecar_agrees_with_the_image_and_the_settings() -> None:
    deployment = _load("deployment.yaml")
    pod = deployment["spec"]["template"]
    rollguard = _containers()["rollguard"]
    env = {e["name"]: e.get("value") for e in rollguard["env"]}
    image = _image_env()
    ports = {p["name"]: p["containerPort"] for p in rollguard["ports"]}
    assert ports == {
        "data": int(image["ROLLGUARD_PORT"]),
        "admin": int(image["ROLLGUARD_ADMIN_PORT"]),
        "grpc": int(image["ROLLGUARD_GRPC_PORT"]),
    }
    # Probes on the V2 health endpoints of the data port.
    assert rollguard["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "data"}
    assert rollguard["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "data"}
    # Non-root with the image's numeric uid, read-only root, nothing extra.
    security = pod["spec"]["securityContext"]
    user = (REPO / "Dockerfile").read_text().split("\nUSER ")[1].split()[0]
    assert security["runAsNonRoot"] is True
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == user
    assert rollguard["securityContext"]["readOnlyRootFilesystem"] is True
    assert rollguard["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Mounts where the image's settings point.
    mounts = {m["mountPath"] for m in rollguard["volumeMounts"]}
    for key in ("ROLLGUARD_REGISTRY", "ROLLGUARD_POLICIES", "ROLLGUARD_STATE"):
        assert env[key] == image[key] and env[key] in mounts
    # Prometheus scrapes the admin port's /metrics.
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == ports["admin"]
    assert notes["prometheus.io/path"] == "/metrics"
    # Shutdown: preStop = drain_delay_s; the model server outlives rollguard's drain; the
    # grace period covers every step.
    drain, grace = float(env["ROLLGUARD_DRAIN_DELAY_S"]), float(env["ROLLGUARD_SHUTDOWN_GRACE_S"])
    pre_stop = rollguard["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop == drain
    upstream = _containers()["model-server"]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert upstream >= pre_stop + drain + grace
    assert pod["spec"]["terminationGracePeriodSeconds"] > upstream
    service = _load("service.yaml")
    assert service["spec"]["ports"][0]["targetPort"] == "data"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def _fleet_docs() -> dict[tuple[str, str], Any]:
    """The fleet overlay's own resources, by (kind, name)."""
    docs = yaml.safe_load_all((FLEET / "redis.yaml").read_text())
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_the_fleet_overlay_points_every_sidecar_at_its_redis(tmp_path: Path) -> None:
    kustomization = yaml.safe_load((FLEET / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../kubernetes", "redis.yaml"]
    done = _validate(FLEET / "redis.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    docs = _fleet_docs()
    # The patch names the base's Deployment and sidecar, and replaces its state.
    (patch_ref,) = kustomization["patches"]
    patch = yaml.safe_load((FLEET / patch_ref["path"]).read_text())
    assert patch["metadata"]["name"] == _load("deployment.yaml")["metadata"]["name"]
    (sidecar,) = patch["spec"]["template"]["spec"]["containers"]
    assert sidecar["name"] in _containers()
    env = {e["name"]: e for e in sidecar["env"]}
    assert "ROLLGUARD_STATE" in {e["name"] for e in _containers()["rollguard"]["env"]}
    url = env["ROLLGUARD_STATE"]["value"]
    # The URL reaches the Service, on the port the Redis container listens on.
    target = RedisTarget.parse(url, environ={})
    service = docs[("Service", "rollguard-redis")]
    assert target.host == service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert target.port == port["port"]
    redis = docs[("Deployment", "rollguard-redis")]["spec"]["template"]
    (container,) = redis["spec"]["containers"]
    assert {p["name"] for p in container["ports"]} == {port["targetPort"]}
    assert service["spec"]["selector"] == redis["metadata"]["labels"]
    # One password, from one Secret, given to both sides; never in the URL.
    secret = env["ROLLGUARD_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    redis_env = {e["name"]: e for e in container["env"]}
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    assert "$(REDIS_PASSWORD)" in container["args"] and "@" not in url
    # The settings rollguard reads from that environment are fleet mode.
    empty = tmp_path / "rollguard.yaml"
    empty.write_text("")
    settings = load_settings(
        empty,
        environ={"ROLLGUARD_STATE": url, "ROLLGUARD_REDIS_PASSWORD": "x" * 24},
    )
    assert settings.fleet_state == url
    # Only the sidecars' pods reach Redis.
    policy = docs[("NetworkPolicy", "rollguard-redis")]["spec"]
    assert policy["podSelector"]["matchLabels"] == redis["metadata"]["labels"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    pods = _load("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert source["podSelector"]["matchLabels"] == pods


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl builds kustomizations")
def test_the_fleet_overlay_builds_and_validates(tmp_path: Path) -> None:
    """Where kubectl is installed (this machine's image has it), the overlay as applied."""
    built = subprocess.run(
        ["kubectl", "kustomize", str(FLEET)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    rendered = tmp_path / "fleet.yaml"
    rendered.write_text(built.stdout)
    done = _validate(rendered)
    assert done.returncode == 0, done.stdout + done.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built.stdout)}
    pod = docs[("Deployment", "fraud")]["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "rollguard")
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["ROLLGUARD_STATE"].startswith("redis://")
    assert [e["name"] for e in sidecar["env"]].count("ROLLGUARD_STATE") == 1
    assert sidecar["image"].endswith("-fleet")


def _project(root: Path) -> Path:
    """A user's repository as the templates expect it, from the Kubernetes ConfigMaps."""
    (root / "config" / "policies").mkdir(parents=True)
    for name, text in _load("policies.yaml")["data"].items():
        (root / "config" / "policies" / name).write_text(text)
    volumes = _load("deployment.yaml")["spec"]["template"]["spec"]["volumes"]
    items = next(v for v in volumes if v["name"] == "registry")["configMap"]["items"]
    data = _load("registry.yaml")["data"]
    for item in items:
        target = root / "registry" / item["path"]
        target.parent.mkdir(parents=True)
        target.write_text(data[item["key"]])
    return root


def test_the_configmaps_hold_a_valid_policy_and_registry(tmp_path: Path) -> None:
    root = _project(tmp_path)
    rollguard = _tool("rollguard")
    checked = subprocess.run(
        [rollguard, "policy", "check", *map(str, (root / "config" / "policies").glob("*.yaml"))],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    verified = subprocess.run(
        [rollguard, "registry", "verify", "--registry", str(root / "registry")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count("\tok") == 2


def test_github_workflow_passes_actionlint(tmp_path: Path) -> None:
    workflow = CI / "github-actions.yml"
    done = subprocess.run(
        [_tool("actionlint"), "-no-color", str(workflow)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(workflow.read_text().replace("runs-on:", "runs_on:"))
    assert subprocess.run([_tool("actionlint"), str(broken)], capture_output=True).returncode == 1


def _templates() -> dict[str, tuple[dict[str, str], list[str]]]:
    """Each template's environment and the shell lines it runs."""
    github = yaml.safe_load((CI / "github-actions.yml").read_text())
    (job,) = github["jobs"].values()
    gitlab = yaml.safe_load((CI / "gitlab-ci.yml").read_text())["rollguard"]
    azure = yaml.safe_load((CI / "azure-pipelines.yml").read_text())
    jenkins = (CI / "Jenkinsfile").read_text()
    block = jenkins.split("environment {", 1)[1].split("}", 1)[0]
    return {
        "github": (github["env"], [s["run"] for s in job["steps"] if "run" in s]),
        "gitlab": (gitlab["variables"], gitlab["script"]),
        "azure": (azure["variables"], [s["script"] for s in azure["steps"] if "script" in s]),
        "jenkins": (
            dict(re.findall(r"(\w+) = '([^']*)'", block)),
            re.findall(r"sh '([^']*)'", jenkins),
        ),
    }


@pytest.mark.parametrize("name", ["github", "gitlab", "azure", "jenkins"])
def test_ci_template_runs_the_gate(tmp_path: Path, name: str) -> None:
    env, lines = _templates()[name]
    gate = [line for line in lines if "rollguard policy check" in line or "registry verify" in line]
    assert len(gate) == 2, lines
    root = _project(tmp_path / "repo")
    shell_env = {
        **os.environ,
        **{k: str(v) for k, v in env.items() if k.startswith("ROLLGUARD_")},
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
    }
    script = "set -e\n" + "\n".join(gate)
    bash = shutil.which("bash") or "/bin/bash"
    run = subprocess.run(
        [bash, "-c", script], cwd=root, env=shell_env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    bad = root / "config" / "policies" / "bad.yaml"
    bad.write_text(POLICY.read_text().replace("strategy: canary", "strategy: rainbow"))
    failed = subprocess.run(
        [bash, "-c", script], cwd=root, env=shell_env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert failed.returncode != 0 and "spec.strategy" in failed.stderr
