"""Who calls the data port: API keys and JWTs, and what each may do (scopes, models).

Off unless configured (`data_auth` in Settings). A request's credential is
`Authorization: Bearer <API key or JWT>` or `x-api-key: <API key>`:

- API keys live in a YAML keys file as sha256 digests, never as keys, with their name,
  scopes, models and rate-limit tier. It is re-read when it changes; an edit that does not
  validate is logged and the previous keys stay in force.
- JWTs are verified with an HS256 key (ROLLGUARD_JWT_SECRET, never a file) or the public
  keys of a JWKS file (RS256 / ES256, chosen by `kid`); `exp` and `sub` are required,
  `iss` and `aud` checked when configured. Scopes come from `scope` (space-separated) or
  `scp`; models from `models` (absent: every model); the tier from `tier`.

No credential or a bad one is 401 with a `WWW-Authenticate` challenge; a good one without
the scope or the model is 403.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rollguard.proxy.errors import Forbidden, Unauthorized

log = logging.getLogger("rollguard")

Scope = Literal["infer", "feedback"]
SCOPES: tuple[Scope, ...] = ("infer", "feedback")
API_KEY_HEADER = "x-api-key"
REALM = 'Bearer realm="rollguard"'
MIN_JWT_SECRET = 32  # bytes: an HS256 key shorter than its hash output is guessable
RELOAD_CHECK_S = 2.0  # how often a keys or JWKS file is looked at for changes
JWT_LEEWAY_S = 30  # clock skew allowed on exp / nbf / iat
_JWT_CACHE = 4096  # verified tokens remembered until they expire


class AuthConfigError(ValueError):
    """The data-plane authentication settings or files are unusable (a start error)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuthConfig(_Frozen):
    """The `data_auth` setting."""

    required: bool = False  # every model needs a credential
    models: list[str] = Field(default_factory=list)  # these need one even when not required
    api_keys_file: Path | None = None  # YAML: keys: [{name, sha256, scopes, models, tier}]
    jwks_file: Path | None = None  # JSON Web Key Set with RS256 / ES256 public keys
    issuer: str | None = None  # JWT `iss` must equal this when set
    audience: str | None = None  # JWT `aud` must contain this when set

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        # ROLLGUARD_DATA_AUTH arrives as text: YAML/JSON flow mapping.
        return yaml.safe_load(value) if isinstance(value, str) else value

    @property
    def enabled(self) -> bool:
        return self.required or bool(self.models)


def _infer_only() -> list[Scope]:
    return ["infer"]


class ApiKey(_Frozen):
    """One entry of the keys file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # hex digest of the key's UTF-8 bytes
    scopes: list[Scope] = Field(default_factory=_infer_only, min_length=1)
    models: list[str] | None = None  # None: every model
    tier: str | None = None  # rate-limit tier (rate_limits.tiers)


class _KeysFile(_Frozen):
    keys: list[ApiKey]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `name` is `key:<name>` or `jwt:<sub>`."""

    name: str
    scopes: frozenset[str]
    models: frozenset[str] | None  # None: every model
    tier: str | None = None

    def may(self, scope: Scope | None, model: str) -> bool:
        """Whether it may use `scope` (None: any of its scopes) on `model`."""
        if self.models is not None and model not in self.models and "*" not in self.models:
            return False
        return scope is None or scope in self.scopes


class _Watched:
    """A file re-read when its size or mtime changes, checked every RELOAD_CHECK_S."""

    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        self.path = path
        self._clock = clock
        self._next_check = 0.0
        self._stamp: tuple[int, int, int] | None = None

    def changed(self) -> bool:
        now = self._clock()
        if now < self._next_check:
            return False
        self._next_check = now + RELOAD_CHECK_S
        try:
            st = os.stat(self.path)
            stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True


class ApiKeys:
    """The keys file: sha256 digest to Principal, reloaded when the file changes."""

    def __init__(
        self,
        path: Path,
        clock: Callable[[], float] = time.monotonic,
        *,
        tiers: Collection[str] | None = None,
    ) -> None:
        self._file = _Watched(path, clock)
        self._tiers = None if tiers is None else frozenset(tiers)
        self._file.changed()  # remember the stamp read below
        self._by_digest = _read_keys(path, self._tiers)

    def lookup(self, key: str) -> Principal | None:
        if self._file.changed():
            try:
                self._by_digest = _read_keys(self._file.path, self._tiers)
                log.info("API keys reloaded from %s (%d keys)", self._file.path,
                         len(self._by_digest))  # fmt: skip
            except AuthConfigError as exc:
                log.error("API keys file not reloaded, the previous keys stay: %s", exc)
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        return self._by_digest.get(digest)

    def tiers(self) -> set[str]:
        return {p.tier for p in self._by_digest.values() if p.tier is not None}


def _read_keys(path: Path, tiers: frozenset[str] | None) -> dict[str, Principal]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AuthConfigError(f"API keys file {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise AuthConfigError(f"API keys file {path}: not valid YAML: {exc}") from None
    try:
        parsed = _KeysFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise AuthConfigError(f"API keys file {path}: {where}: {first['msg']}") from None
    found: dict[str, Principal] = {}
    names: set[str] = set()
    for entry in parsed.keys:
        if entry.name in names or entry.sha256 in found:
            raise AuthConfigError(f"API keys file {path}: key {entry.name!r} is listed twice")
        names.add(entry.name)
        if tiers is not None and entry.tier is not None and entry.tier not in tiers:
            raise AuthConfigError(
                f"API keys file {path}: key {entry.name!r} has tier {entry.tier!r}; "
                f"rate_limits.tiers names {sorted(tiers) or 'none'}"
            )
        models = None if entry.models is None else frozenset(entry.models)
        found[entry.sha256] = Principal(
            f"key:{entry.name}", frozenset(entry.scopes), models, entry.tier
        )
    return found


class JwtVerifier:
    """JWT signature and claims: an HS256 key, or the keys of a JWKS file."""

    def __init__(
        self,
        *,
        secret: str | None,
        jwks_file: Path | None,
        issuer: str | None,
        audience: str | None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        try:
            import jwt
        except ImportError:
            raise AuthConfigError(
                "JWT authentication is configured but PyJWT is not installed: "
                "pip install 'rollguard[auth]'"
            ) from None
        self._jwt = jwt
        if secret is not None and len(secret.encode()) < MIN_JWT_SECRET:
            raise AuthConfigError(
                f"ROLLGUARD_JWT_SECRET is {len(secret.encode())} bytes; HS256 needs at "
                f"least {MIN_JWT_SECRET}"
            )
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self._wall = wall
        self._jwks = _Watched(jwks_file, clock) if jwks_file is not None else None
        self._keys: dict[str | None, tuple[Any, str]] = {}
        if self._jwks is not None:
            self._jwks.changed()
            self._keys = self._read_jwks(self._jwks.path)
        self._verified: dict[str, tuple[Principal, float]] = {}

    def _read_jwks(self, path: Path) -> dict[str | None, tuple[Any, str]]:
        """kid -> (public key, algorithm); a single key without kid is found under None."""
        jwt = self._jwt
        try:
            keys = jwt.PyJWKSet.from_json(path.read_text(encoding="utf-8")).keys
        except OSError as exc:
            raise AuthConfigError(f"JWKS file {path}: cannot read: {exc.strerror}") from None
        except (jwt.PyJWKSetError, jwt.PyJWKError, ValueError, json.JSONDecodeError) as exc:
            raise AuthConfigError(f"JWKS file {path}: {exc}") from None
        found: dict[str | None, tuple[Any, str]] = {}
        for key in keys:
            algorithm = key.algorithm_name
            if algorithm not in ("RS256", "ES256"):
                raise AuthConfigError(
                    f"JWKS file {path}: key {key.key_id!r} is {algorithm}; "
                    "only RS256 and ES256 keys are taken"
                )
            found[key.key_id] = (key.key, algorithm)
        if len(found) == 1 and None not in found:
            found[None] = next(iter(found.values()))
        return found

    def verify(self, token: str) -> Principal:
        cached = self._verified.get(token)
        if cached is not None and cached[1] > self._wall():
            return cached[0]
        jwt = self._jwt
        if self._jwks is not None and self._jwks.changed():
            try:
                self._keys = self._read_jwks(self._jwks.path)
                self._verified.clear()
            except AuthConfigError as exc:
                log.error("JWKS file not reloaded, the previous keys stay: %s", exc)
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            if algorithm == "HS256" and self._secret is not None:
                key: Any = self._secret
            elif algorithm in ("RS256", "ES256") and self._keys:
                found = self._keys.get(header.get("kid"))
                if found is None or found[1] != algorithm:
                    raise _invalid("no key for its kid and alg")
                key = found[0]
            else:
                raise _invalid(f"alg {algorithm!r} is not accepted")
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self._issuer,
                audience=self._audience,
                leeway=JWT_LEEWAY_S,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise _invalid("the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise _invalid(f"the token is not valid: {exc}") from None
        principal = _principal_of(claims)
        if len(self._verified) >= _JWT_CACHE:
            self._verified.clear()
        self._verified[token] = (principal, float(claims["exp"]))
        return principal


def _principal_of(claims: Mapping[str, Any]) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or not sub.isprintable():
        raise _invalid("'sub' must be a printable string")
    raw = claims.get("scope", claims.get("scp", ""))
    scopes = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
    models = claims.get("models")
    if models is not None and not (
        isinstance(models, list) and all(isinstance(m, str) for m in models)
    ):
        raise _invalid("'models' must be a list of model names")
    tier = claims.get("tier")
    return Principal(
        f"jwt:{sub}",
        frozenset(s for s in scopes if s in SCOPES),
        None if models is None else frozenset(models),
        tier if isinstance(tier, str) else None,
    )


def _invalid(reason: str) -> Unauthorized:
    return Unauthorized(
        f"the credential is not valid: {reason}",
        challenge=f'{REALM}, error="invalid_token"',
    )


class Authenticator:
    """Decides per request: which models need a credential, whose it is, what it allows."""

    def __init__(
        self,
        config: AuthConfig,
        *,
        jwt_secret: str | None,
        tiers: Collection[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`tiers`: the rate-limit tiers a key may name (None: any)."""
        self.config = config
        self._all = config.required
        self._models = frozenset(config.models)
        self.keys = (
            ApiKeys(config.api_keys_file, clock, tiers=tiers) if config.api_keys_file else None
        )
        self.jwt = (
            JwtVerifier(
                secret=jwt_secret,
                jwks_file=config.jwks_file,
                issuer=config.issuer,
                audience=config.audience,
                clock=clock,
            )
            if jwt_secret is not None or config.jwks_file is not None
            else None
        )
        self.active = self.keys is not None or self.jwt is not None
        if config.enabled and not self.active:
            raise AuthConfigError(
                "data_auth requires credentials but names no source: set "
                "data_auth.api_keys_file, data_auth.jwks_file or ROLLGUARD_JWT_SECRET"
            )

    def required_for(self, model: str) -> bool:
        return self._all or model in self._models

    def principal(self, headers: Mapping[str, str]) -> Principal | None:
        """The caller the headers prove, None when they bring no credential; Unauthorized
        for a credential that does not verify."""
        if not self.active:
            return None
        given = headers.get("authorization")
        if given is not None:
            scheme, _, token = given.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized(
                    "the Authorization header must be 'Bearer <API key or JWT>'",
                    challenge=f'{REALM}, error="invalid_request"',
                )
            token = token.strip()
        else:
            token = headers.get(API_KEY_HEADER, "").strip()
            if not token:
                return None
        if self.jwt is not None and token.startswith("eyJ") and token.count(".") == 2:
            return self.jwt.verify(token)
        if self.keys is not None:
            found = self.keys.lookup(token)
            if found is not None:
                return found
        raise _invalid("unknown API key" if self.keys is not None else "not a JWT")

    def check(
        self, headers: Mapping[str, str], scope: Scope | None, model: str
    ) -> Principal | None:
        """The caller of a request on `model` needing `scope` (None: any scope), checked:
        401 without a credential where one is required, 403 when it does not allow it."""
        principal = self.principal(headers)
        if not self.required_for(model):
            return principal
        if principal is None:
            raise Unauthorized(
                f"model {model!r} needs a credential: 'Authorization: Bearer <API key or "
                f"JWT>' or '{API_KEY_HEADER}: <API key>'",
                challenge=REALM,
            )
        if not principal.may(scope, model):
            what = f"use {scope!r} on" if scope is not None else "use"
            raise Forbidden(
                f"credential {principal.name!r} may not {what} model {model!r}",
                challenge=f'{REALM}, error="insufficient_scope"'
                + (f', scope="{scope}"' if scope is not None else ""),
            )
        return principal
