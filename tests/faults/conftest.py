"""The proxy tests' fixtures (a real demo registry, built once), shared with the fault tests."""

from tests.proxy.conftest import demo_registry, make_registry

__all__ = ["demo_registry", "make_registry"]
