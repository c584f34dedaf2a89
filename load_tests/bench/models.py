"""The one model every target serves, in every form they need, and the one request body.

The breast_cancer classifier of the demo registry (fraud 1.0.0, a StandardScaler +
LogisticRegression pipeline) is exported to ONNX (fraud-onnx 1.0.0) for bare and
rollguard, and re-saved with joblib for MLServer's scikit-learn runtime. Rollguard's
registries and policies are written here: in-process ONNX versions, `http` versions
in front of bare servers, a canary and a shadow rollout.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import yaml

from rollguard.serving.demo.build import build_demo_registry, load_eval_data
from rollguard.serving.manifest import MANIFEST_NAME, dump_manifest, load_manifest, parse_manifest

MODEL = "fraud-onnx"
STABLE, CANDIDATE = "1.0.0", "1.1.0"
KEY_HEADER = "x-user-id"
CANARY_WEIGHT = 25.0


def request_body() -> bytes:
    """One breast_cancer test row as a V2 JSON infer request: the body every target gets."""
    x, _ = load_eval_data()
    row = [float(v) for v in x[0]]
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, len(row)], "data": row}]}
    return orjson.dumps(doc)


def build_demo(root: Path, frameworks: tuple[str, ...] = ("onnx", "sklearn")) -> Path:
    """The demo registry (ONNX, and scikit-learn for MLServer), built once under `root`."""
    demo = root / "demo-registry"
    # The demo builder logs each version at INFO; the benchmark's own output is enough.
    logging.getLogger("rollguard.serving.demo.build").setLevel(logging.WARNING)
    build_demo_registry(demo, frameworks=frameworks)
    return demo


def onnx_path(demo: Path, version: str = STABLE) -> Path:
    return demo / MODEL / version / "model.onnx"


def inprocess_registry(demo: Path, root: Path) -> Path:
    """rollguard serving the ONNX versions itself: links to the demo versions."""
    registry = root / "registry-inprocess"
    for version in (STABLE, CANDIDATE):
        link = registry / MODEL / version
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(demo / MODEL / version)
    return registry


def http_registry(demo: Path, root: Path, name: str, endpoints: dict[str, str]) -> Path:
    """rollguard as a proxy: one `framework: http` version per upstream base URL."""
    source = load_manifest(demo / MODEL / STABLE / MANIFEST_NAME)
    registry = root / name
    for version, base in endpoints.items():
        directory = registry / MODEL / version
        directory.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {
            "name": MODEL,
            "version": version,
            "framework": "http",
            "endpoint": f"{base}/v2/models/{MODEL}",
            "stage": "production" if version == STABLE else "staging",
            "inputs": [t.model_dump() for t in source.inputs],
            "outputs": [t.model_dump() for t in source.outputs],
        }
        dump_manifest(parse_manifest(doc, f"{name}/{version}"), directory / MANIFEST_NAME)
    return registry


def _rollout(name: str, strategy: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": MODEL,
        "stable": STABLE,
        "candidate": CANDIDATE,
        "strategy": strategy,
        "interval": "1s",
        "window": 2000,
    }
    if strategy == "canary":
        # A first step held for an hour: the canary stays active for the whole run,
        # while the policy loop evaluates every check each second.
        spec |= {
            "split": "hash",
            "key": f"header:{KEY_HEADER}",
            "steps": [{"weight": CANARY_WEIGHT, "hold": "1h"}, {"weight": 100}],
            "checks": [
                {"metric": "error_rate", "max": 0.01, "min_samples": 100, "on_fail": "rollback"},
                # Both variants are the same size of model: a noisy p99 should not end the run.
                {"metric": "latency_p99", "max_ratio_to_stable": 1.5, "on_fail": "hold"},
                {"metric": "srm", "on_fail": "alert"},
            ],
        }
    else:
        spec |= {
            "split": "random",
            "checks": [
                {"metric": "agreement", "min": 0.95, "on_fail": "hold"},
                {"metric": "latency_p99", "max_ratio_to_stable": 2.0, "on_fail": "hold"},
            ],
        }
    return {
        "apiVersion": "rollguard/v1",
        "kind": "Rollout",
        "metadata": {"name": name},
        "spec": spec,
    }


def policies(root: Path, strategy: str | None) -> Path:
    """A policies directory holding one canary or shadow rollout of MODEL, or none."""
    directory = root / f"policies-{strategy or 'none'}"
    directory.mkdir(parents=True, exist_ok=True)
    if strategy is not None:
        text = yaml.safe_dump(_rollout(f"bench-{strategy}", strategy), sort_keys=False)
        (directory / f"{strategy}.yaml").write_text(text, encoding="utf-8")
    return directory


def mlserver_model(demo: Path, root: Path) -> Path:
    """MLServer's model repository: the fraud 1.0.0 pipeline re-saved as model.joblib."""
    import joblib
    import skops.io

    repository = root / "mlserver-models"
    model_dir = repository / "fraud"
    model_dir.mkdir(parents=True, exist_ok=True)
    skops_file = demo / "fraud" / STABLE / "model.skops"
    # The file is the one the demo builder just wrote; its types are listed, not trusted blindly.
    model = skops.io.load(skops_file, trusted=skops.io.get_untrusted_types(file=skops_file))
    joblib.dump(model, model_dir / "model.joblib")
    settings = {
        "name": "fraud",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": STABLE},
    }
    (model_dir / "model-settings.json").write_bytes(orjson.dumps(settings))
    return repository
