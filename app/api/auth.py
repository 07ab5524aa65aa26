"""Who is calling, and what they may do: principals, permissions, roles, JWT and API-key checks.

Every JSON-RPC method that declares a `permission` needs an authenticated principal holding it;
`rpc.discover` and the health endpoints need none. A principal comes from either

- `Authorization: Bearer <JWT>`: HS256 with `RAYGRPO_JWT_SECRET` (or the file `RAYGRPO_JWT_SECRET_FILE`
  names) or RS256 with `RAYGRPO_JWT_PUBLIC_KEY[_FILE]`; `exp`, `iat`, `aud` and `iss` are required and
  checked; `sub` is the user, `role` one of ROLES, optional `scopes` narrow the role; or
- `X-API-Key: rg_...` (or `Authorization: Bearer rg_...`, as OpenAI clients send their api_key): looked up by
  its SHA-256 in `api_keys`; revoked and expired keys are refused.

The HTTP layer (app.api.main) authenticates the headers once per request and puts the outcome in a
context variable; `authorize` (the Registry's guard) checks it against the called method, so a batch
is checked call by call. A user's jobs are theirs: `Principal.owns` is what handlers test, and they
answer "not found" for another user's object, so its existence does not leak.

Without any configured key, a local secret is created under RAYGRPO_HOME (mode 0600) the first time it
is needed: one machine works out of the box, `raygrpo token` / `python -m app.api.auth token` mints a token
with it. A cluster must set `RAYGRPO_JWT_SECRET` (or a public key) so every replica agrees.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.api.jsonrpc import FORBIDDEN, UNAUTHENTICATED, Method, RPCError

if TYPE_CHECKING:
    from app.settings import Settings

PERMISSIONS: tuple[str, ...] = (
    "training:start",
    "training:view",
    "training:cancel",
    "training:evaluate",
    "data:export",
    "experiments:read",
    "experiments:write",
    "models:read",
    "models:write",
    "models:deploy",
    "datasets:read",
    "datasets:write",
    "admin:keys",
    "admin:audit",
)

ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset(PERMISSIONS),
    "researcher": frozenset(p for p in PERMISSIONS if not p.startswith("admin:")),
    "viewer": frozenset({"training:view", "experiments:read", "models:read", "datasets:read"}),
}

API_KEY_PREFIX = "rg_"
AUTHENTICATED = "authenticated"
"""The `permission` of a method any authenticated caller may call."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    subject: str
    role: str
    permissions: frozenset[str]
    auth_method: str = "jwt"  # jwt | api_key | local
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def can(self, permission: str) -> bool:
        return permission in self.permissions

    def owns(self, owner: str | None) -> bool:
        """Whether this caller may see and act on an object owned by `owner` (admins see everything)."""
        return self.is_admin or (owner is not None and owner == self.subject)

    @classmethod
    def of(cls, subject: str, role: str, scopes: list[str] | None = None, **kw: Any) -> Principal:
        """A principal with the role's permissions, narrowed to `scopes` when any are given."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        perms = ROLES[role]
        if scopes:
            unknown = set(scopes) - set(PERMISSIONS)
            if unknown:
                raise ValueError(f"unknown scopes {sorted(unknown)}")
            perms = perms & frozenset(scopes)
        return cls(subject=subject, role=role, permissions=perms, **kw)


@dataclass
class RequestState:
    """What the HTTP layer learned about one request, visible to the registry's hooks and handlers."""

    request_id: str
    client_ip: str | None = None
    principal: Principal | None = None
    auth_error: str | None = None
    """why the presented credentials were refused (None: none presented, or accepted)"""
    headers: dict[str, str] = field(default_factory=dict)
    """response headers the hooks want sent (rate limit counters)"""
    services: Any = None
    """the app's Context (database, limiter) for hooks that need it"""
    rpc_calls: list[tuple[str, int]] = field(default_factory=list)
    """(method, code) of each JSON-RPC call answered, counted with the HTTP request in one round trip"""


_request: contextvars.ContextVar[RequestState | None] = contextvars.ContextVar("raygrpo_request", default=None)


def request_state() -> RequestState | None:
    return _request.get()


def set_request_state(state: RequestState | None) -> contextvars.Token:
    return _request.set(state)


def reset_request_state(token: contextvars.Token) -> None:
    _request.reset(token)


def current_principal() -> Principal:
    """The caller of the method being run. Inside a handler of a method with a permission it is always set."""
    state = _request.get()
    if state is None or state.principal is None:
        raise RPCError(UNAUTHENTICATED, "unauthenticated: credentials required")
    return state.principal


def caller_is_admin() -> bool:
    """Whether the request being answered comes from an admin (False outside a request). Replies show server
    file paths to admins only."""
    state = _request.get()
    return state is not None and state.principal is not None and state.principal.is_admin


def authorize(method: Method) -> Principal | None:
    """The Registry's guard: refuse a call whose caller is unknown or lacks the method's permission."""
    if method.permission is None:
        return None
    state = _request.get()
    if state is None or state.principal is None:
        reason = state.auth_error if state is not None and state.auth_error else "credentials required"
        raise RPCError(UNAUTHENTICATED, f"unauthenticated: {reason}",
                       {"hint": "send Authorization: Bearer <JWT> or X-API-Key"})
    if method.permission != AUTHENTICATED and not state.principal.can(method.permission):
        raise RPCError(FORBIDDEN, f"forbidden: {method.name} needs the permission {method.permission}",
                       {"permission": method.permission})
    return state.principal


# ---- keys and tokens ---------------------------------------------------------------------------

def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def local_secret(home: Path) -> str:
    """The machine-local HS256 secret under `home`, created (0600, atomically) when missing."""
    path = home / "jwt_secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    home.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def mint_token(settings: Settings, subject: str, role: str = "admin", *, ttl_s: int = 3600,
               scopes: list[str] | None = None, private_key: str | None = None) -> str:
    """A signed JWT for `subject`: HS256 with the configured (or local) secret, RS256 with `private_key`."""
    import jwt

    Principal.of(subject, role, scopes)  # validates role and scopes
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "role": role, "iat": now, "exp": now + ttl_s,
                              "aud": settings.jwt_audience, "iss": settings.jwt_issuer}
    if scopes:
        claims["scopes"] = scopes
    if private_key is not None:
        return jwt.encode(claims, private_key, algorithm="RS256")
    return jwt.encode(claims, hs256_secret(settings), algorithm="HS256")


def hs256_secret(settings: Settings) -> str:
    return settings.jwt_secret or local_secret(settings.home)


def verify_jwt(settings: Settings, token: str) -> Principal:
    """The principal a bearer token names, or ValueError saying (without secrets) why it is refused."""
    import jwt

    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise ValueError("malformed token") from None
    alg = header.get("alg")
    if alg == "RS256" and settings.jwt_public_key:
        key: Any = settings.jwt_public_key
    elif alg == "HS256" and not settings.jwt_public_key:
        key = hs256_secret(settings)
    else:
        raise ValueError(f"token algorithm {alg!r} is not accepted")
    try:
        claims = jwt.decode(
            token, key, algorithms=[alg], audience=settings.jwt_audience, issuer=settings.jwt_issuer,
            leeway=settings.jwt_leeway_s, options={"require": ["exp", "iat", "aud", "iss", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise ValueError("token expired") from None
    except jwt.InvalidAudienceError:
        raise ValueError("token audience not accepted") from None
    except jwt.InvalidIssuerError:
        raise ValueError("token issuer not accepted") from None
    except jwt.InvalidSignatureError:
        raise ValueError("token signature invalid") from None
    except jwt.MissingRequiredClaimError as e:
        raise ValueError(f"token lacks the {e.claim} claim") from None
    except jwt.ImmatureSignatureError:
        raise ValueError("token issued in the future") from None
    except jwt.PyJWTError:
        raise ValueError("malformed token") from None
    subject, role, scopes = claims.get("sub"), claims.get("role", "viewer"), claims.get("scopes")
    if not isinstance(subject, str) or not subject or len(subject) > 256:
        raise ValueError("token subject invalid")
    if scopes is not None and not (isinstance(scopes, list) and all(isinstance(s, str) for s in scopes)):
        raise ValueError("token scopes invalid")
    try:
        return Principal.of(subject, str(role), scopes)
    except ValueError as e:
        raise ValueError(f"token {e}") from None


def verify_api_key(engine: Any, key: str) -> Principal:
    """The principal of an API key, or ValueError when it is unknown, revoked or expired."""
    from sqlmodel import Session, select

    from app.data.tables import ApiKey, utcnow

    if not key.startswith(API_KEY_PREFIX) or len(key) > 200:
        raise ValueError("malformed API key")
    with Session(engine) as s:
        row = s.exec(select(ApiKey).where(ApiKey.key_hash == hash_api_key(key))).first()
        if row is None:
            raise ValueError("unknown API key")
        now = utcnow()
        if row.revoked_at is not None:
            raise ValueError("API key revoked")
        if row.expires_at is not None and row.expires_at <= now:
            raise ValueError("API key expired")
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
            row.last_used_at = now  # at most one write a minute per key
            s.add(row)
            s.commit()
        return Principal.of(row.owner, row.role, row.scopes or None, auth_method="api_key", key_id=row.id)


def authenticate(settings: Settings, engine: Any, authorization: str | None, api_key: str | None
                 ) -> tuple[Principal | None, str | None]:
    """(principal, None) for accepted credentials, (None, reason) for refused ones, (None, None) for none."""
    if settings.auth == "off":
        return LOCAL_ADMIN, None
    try:
        if api_key:
            return verify_api_key(engine, api_key.strip()), None
        if authorization:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None, "Authorization must be 'Bearer <token>'"
            if token.strip().startswith(API_KEY_PREFIX):  # an API key as a bearer: what OpenAI clients send
                return verify_api_key(engine, token.strip()), None
            return verify_jwt(settings, token.strip()), None
    except ValueError as e:
        return None, str(e)
    return None, None


LOCAL_ADMIN = Principal.of("local", "admin", auth_method="local")
"""The caller when RAYGRPO_AUTH=off (a developer's own machine only)."""


def main(argv: list[str] | None = None) -> int:
    """`python -m app.api.auth token [--sub S] [--role R] [--ttl SECONDS]`: print a JWT for local use."""
    import argparse

    from app.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m app.api.auth")
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("token", help="mint a JWT signed with the configured or local secret")
    tok.add_argument("--sub", default=os.environ.get("USER") or "local")
    tok.add_argument("--role", default="admin", choices=sorted(ROLES))
    tok.add_argument("--ttl", type=int, default=24 * 3600, help="seconds until it expires")
    tok.add_argument("--scope", action="append", default=None, choices=PERMISSIONS)
    args = parser.parse_args(argv)
    print(mint_token(get_settings(), args.sub, args.role, ttl_s=args.ttl, scopes=args.scope))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
