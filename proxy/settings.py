"""The gateway's one settings object: config file, then ROLLGUARD_* environment, then flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "rollguard.yaml"
ENV_PREFIX = "ROLLGUARD_"


class SettingsError(Exception):
    """The configuration is invalid; the message names the key and the value."""


class Settings(BaseModel):
    """Every gateway setting, validated once at start-up and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)  # the data port
    admin_host: str = "127.0.0.1"  # admin and /metrics: loopback unless opened on purpose
    admin_port: int = Field(default=8081, ge=0, le=65535)
    registry: Path = Path("registry")
    policies: Path = Path("policies")
    state: Path = Path(".rollguard")
    admin_token: str | None = None  # from ROLLGUARD_ADMIN_TOKEN, never the config file
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_inflight: int = Field(default=512, ge=1)
    header_timeout_s: float = Field(default=10.0, gt=0)  # a head's arrival; a body's pauses
    keepalive_s: float = Field(default=75.0, gt=0)  # idle kept-alive connections close
    shutdown_grace_s: float = Field(default=5.0, ge=0)  # requests in flight at shutdown
    request_timeout_s: float = Field(default=10.0, gt=0)
    executor_threads: int = Field(default=2, ge=1, le=256)
    inline_below_us: float = Field(default=100.0, ge=0)  # faster models skip the executor
    registry_poll_s: float = Field(default=2.0, gt=0)
    policy_poll_s: float = Field(default=2.0, gt=0)
    window: int = Field(default=2000, ge=10)  # per-variant ring buffer, when no policy says
    feedback_capacity: int = Field(default=100_000, ge=100)
    shadow_queue: int = Field(default=256, ge=0)
    shadow_concurrency: int = Field(default=8, ge=1)
    shadow_timeout_s: float = Field(default=5.0, gt=0)
    shadow_budget: float = Field(default=0.01, ge=0, le=1)  # copies per primary while busy
    agreement_tolerance: float = Field(default=1e-6, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings")
    if "admin_token" in data:
        raise SettingsError(f"{path}: admin_token belongs in ${ENV_PREFIX}ADMIN_TOKEN, not a file")
    # Relative paths in a config file are relative to the working directory, like flags.
    return data


def load_settings(
    config: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge defaults < config file < ROLLGUARD_* environment < explicit overrides."""
    environ = os.environ if environ is None else environ
    path = config or (
        Path(environ[ENV_PREFIX + "CONFIG"]) if ENV_PREFIX + "CONFIG" in environ else DEFAULT_CONFIG
    )
    merged: dict[str, Any] = _read_file(path) if path.exists() or config else {}
    fields = Settings.model_fields
    for name in fields:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            merged[name] = value
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if isinstance(merged.get("log_level"), str):
        merged["log_level"] = merged["log_level"].upper()
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        source = f"{ENV_PREFIX}{key.upper()}" if ENV_PREFIX + key.upper() in environ else key
        raise SettingsError(f"setting {source}={first.get('input')!r}: {first['msg']}") from None
