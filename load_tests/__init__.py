"""Load generator, scenarios, reports and benchmarks for rollguard (run from the repo root)."""
