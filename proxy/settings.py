"""The gateway's one settings object: config file, then ROLLGUARD_* environment, then flags."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from rollguard.proxy.auth import AuthConfig
from rollguard.proxy.limits import RateLimitConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "rollguard.yaml"
ENV_PREFIX = "ROLLGUARD_"


class SettingsError(Exception):
    """The configuration is invalid; the message names the key and the value."""


_NOT_FORWARDED = frozenset(
    {"host", "content-length", "content-type", "content-encoding", "transfer-encoding",
     "connection", "keep-alive", "upgrade", "expect", "te", "trailer",
     "inference-header-content-length"}
)  # fmt: skip


def _forwardable(names: tuple[str, ...]) -> tuple[str, ...]:
    lowered = tuple(n.lower() for n in names)
    for name in lowered:
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9a-z-]+", name):
            raise ValueError(f"{name!r} is not a header name")
        if name == "authorization":
            raise ValueError("authorization is forwarded by forward_authorization: true")
        if name in _NOT_FORWARDED:
            raise ValueError(f"{name!r} belongs to the connection, not the client's request")
    return tuple(dict.fromkeys(lowered))


def _local_state(path: Path) -> Path:
    # Path("redis://h:1/0") is the directory "redis:/h:1/0": refuse it rather than let a
    # user believe the processes share state. A redis:// string never gets here: it is
    # taken as fleet mode (`Settings._fleet`).
    if str(path).startswith(("redis:", "rediss:")):
        raise ValueError("a redis:// state must be given as a string (redis://host:port/db)")
    return path


_FLEET_SCHEMES = ("redis://", "rediss://")


def _fleet_target(state: str) -> None:
    """ValueError naming what is wrong with a `state: redis://...` (a password redacted)."""
    try:
        from rollguard.proxy.fleet.connection import RedisTarget
    except ImportError as exc:
        raise ValueError(f"fleet mode needs pip install 'rollguard[fleet]' ({exc})") from None
    from rollguard.proxy.fleet.errors import InvalidTarget

    try:
        RedisTarget.parse(state)
    except InvalidTarget as exc:
        raise ValueError(str(exc)) from None


class Settings(BaseModel):
    """Every gateway setting, validated once at start-up and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)  # the data port
    admin_host: str = "127.0.0.1"  # admin and /metrics: loopback unless opened on purpose
    admin_port: int = Field(default=8081, ge=0, le=65535)
    # The V2 gRPC API (proxy/grpc_endpoints.py) on a port of its own; grpc_host unset:
    # `host`. grpc_enabled false: no gRPC listener.
    grpc_enabled: bool = True
    grpc_host: str | None = None
    grpc_port: int = Field(default=8082, ge=0, le=65535)
    # `serve --workers N` (proxy/workers.py): N processes share the data and gRPC ports
    # (SO_REUSEPORT); worker K's admin port is admin_port + K. N > 1 needs fleet mode.
    workers: int = Field(default=1, ge=1, le=64)
    registry: Path = Path("registry")
    policies: Path = Path("policies")
    state: Annotated[Path, AfterValidator(_local_state)] = Path(".rollguard")
    # Fleet mode: `state: redis://host:port/db` (or rediss://) lands here, the URL as given
    # (no password in it: ROLLGUARD_REDIS_PASSWORD); `state` then keeps its default.
    fleet_state: str | None = None
    audit_key: str | None = Field(default=None, repr=False)  # ROLLGUARD_AUDIT_KEY only: HMAC key
    audit_key_file: Path | None = None  # or the key in a file outside the state directory
    audit_refuse_broken: bool = False  # true: a broken audit chain stops the start
    admin_token: str | None = Field(default=None, repr=False)  # ROLLGUARD_ADMIN_TOKEN only
    admin_auth: Literal["token", "none"] = "token"  # none: admin without a token, loopback only
    metrics_auth: Literal["none", "token"] = "none"  # token: /metrics needs the admin token too
    webhook_allowed_hosts: tuple[str, ...] = ()  # host, host:port or *.domain webhooks may reach
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_inflight: int = Field(default=512, ge=1)
    data_auth: AuthConfig = Field(default_factory=AuthConfig)  # data-port credentials
    jwt_secret: str | None = Field(default=None, repr=False)  # ROLLGUARD_JWT_SECRET only
    rate_limits: RateLimitConfig = Field(default_factory=RateLimitConfig)  # per client
    max_buffered_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)  # all bodies held
    max_connections: int = Field(default=4096, ge=1)  # data-port connections in total
    max_connections_per_client: int = Field(default=1024, ge=0)  # per address; 0: no cap
    header_timeout_s: float = Field(default=10.0, gt=0)  # a head's arrival; a body's pauses
    body_timeout_s: float = Field(default=60.0, gt=0)  # a whole body's arrival after its head
    keepalive_s: float = Field(default=75.0, gt=0)  # idle kept-alive connections close
    drain_delay_s: float = Field(default=5.0, ge=0)  # SIGTERM: not ready, still serving
    shutdown_grace_s: float = Field(default=5.0, ge=0)  # requests in flight at shutdown
    strict_readiness: bool = False  # ready only while every model's primary can serve
    request_timeout_s: float = Field(default=10.0, gt=0)
    executor_threads: int = Field(default=2, ge=1, le=256)  # per local version, its own
    version_concurrency: int = Field(default=64, ge=1)  # calls running in one version
    version_queue: int = Field(default=256, ge=0)  # calls waiting for one; then 503 at once
    shadow_threads: int = Field(default=1, ge=1, le=64)  # a local version's, for shadow copies
    inline_below_us: float = Field(default=100.0, ge=0)  # faster models skip the executor
    registry_poll_s: float = Field(default=2.0, gt=0)
    policy_poll_s: float = Field(default=2.0, gt=0)
    failover_poll_s: float = Field(default=0.25, gt=0)  # rollouts re-read candidates' availability
    window: int = Field(default=2000, ge=10)  # per-variant ring buffer, when no policy says
    # The feedback index (proxy/feedback.py): rows of answered requests remembered for
    # labels (about 0.5 KB a one-row request), and for how long; later labels get a 410.
    feedback_capacity: int = Field(default=100_000, ge=100)
    feedback_max_age_s: float = Field(default=86_400.0, gt=0)
    shadow_queue: int = Field(default=256, ge=0)
    # Copies in flight at once: about rate x the shadow's latency are needed to mirror
    # everything (2,000 req/s at 4 ms: 8; 200 req/s at 200 ms: 40). 8 dropped most copies
    # of a busy proxy's shadow; Envoy's mirror is bounded only by its circuit breakers
    # (1,024 requests). A hung shadow holds this many upstream connections until
    # `shadow_timeout_s`, never a client's slot.
    shadow_concurrency: int = Field(default=64, ge=1)
    shadow_timeout_s: float = Field(default=5.0, gt=0)
    # Shadow copies are shed only while the gateway's own event loop, process or cgroup
    # CPU quota is at `shadow_pressure` or above (proxy/load.py); then `shadow_budget`
    # copies per primary still go.
    shadow_budget: float = Field(default=0.5, ge=0, le=1)
    shadow_pressure: float = Field(default=0.9, gt=0, le=1)
    agreement_tolerance: float = Field(default=1e-6, ge=0)
    # Client headers an http upstream gets with a forwarded request (x-request-id: the
    # request's id, the client's or rollguard's); Authorization only when opted in.
    forward_headers: Annotated[tuple[str, ...], AfterValidator(_forwardable)] = (
        "traceparent",
        "tracestate",
        "x-request-id",
    )
    forward_authorization: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @model_validator(mode="before")
    @classmethod
    def _fleet(cls, data: Any) -> Any:
        """`state: redis://...` is fleet mode: checked here, kept as `fleet_state`."""
        if not isinstance(data, dict):
            return data
        if data.get("fleet_state") is not None:
            raise ValueError("fleet_state is not a setting of its own: set state: redis://...")
        state = data.get("state")
        if not (isinstance(state, str) and state.startswith(_FLEET_SCHEMES)):
            return data
        _fleet_target(state)
        return {k: v for k, v in data.items() if k != "state"} | {"fleet_state": state}


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
    if "audit_key" in data:
        raise SettingsError(f"{path}: audit_key belongs in ${ENV_PREFIX}AUDIT_KEY, not a file")
    if "jwt_secret" in data:
        raise SettingsError(f"{path}: jwt_secret belongs in ${ENV_PREFIX}JWT_SECRET, not a file")
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
        if value is not None and (value != "" or name == "admin_token"):  # empty: refused
            merged[name] = value
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if isinstance(merged.get("log_level"), str):
        merged["log_level"] = merged["log_level"].upper()
    for listed in ("webhook_allowed_hosts", "forward_headers"):  # comma lists from the environment
        if isinstance(value := merged.get(listed), str):
            merged[listed] = [h.strip() for h in value.split(",") if h.strip()]
    state = merged.get("state")
    if isinstance(state, str) and state.startswith(_FLEET_SCHEMES):
        # Checked here, not in the model, so that the message never echoes the URL as given.
        try:
            _fleet_target(state)
        except ValueError as exc:
            source = f"{ENV_PREFIX}STATE" if f"{ENV_PREFIX}STATE" in environ else "state"
            raise SettingsError(f"setting {source}: {exc}") from None
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        source = f"{ENV_PREFIX}{key.upper()}" if ENV_PREFIX + key.upper() in environ else key
        raise SettingsError(f"setting {source}={first.get('input')!r}: {first['msg']}") from None
