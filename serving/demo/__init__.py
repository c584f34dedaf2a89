"""A small real registry for `rollguard demo` and the tests: models trained on bundled datasets."""

from rollguard.serving.demo.build import build_demo_registry, load_eval_data

__all__ = ["build_demo_registry", "load_eval_data"]
