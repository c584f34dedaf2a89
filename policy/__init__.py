"""Rollout policies: schema, validation, statistics, checks, decisions, state and audit."""
