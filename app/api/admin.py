"""Admin methods (`auth.*`, `audit.*`) and the audit observer.

API keys are issued by admins with `auth.create_api_key`: the key is in that reply only; the
database keeps its SHA-256, an owner, a role and optional narrower scopes. Every state-changing call
(a method registered with `mutates=True`), allowed or refused, becomes one `audit_log` row: who, how
they authenticated, what, on which object, when, from which address, and the outcome.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select

from app.api.auth import AUTHENTICATED, PERMISSIONS, Principal, current_principal, hash_api_key, new_api_key
from app.api.auth import request_state as _request_state
from app.api.context import registry
from app.api.jsonrpc import INVALID_PARAMS, NOT_FOUND, CallRecord, RPCError
from app.data import db
from app.data.tables import ApiKey, AuditEntry, utcnow

log = logging.getLogger("app.audit")

# Params never written to the audit log: bulk data, or what could carry a secret.
_LEFT_OUT = {"training_data", "evaluation_data", "evaluation_queries", "api_key", "password", "secret", "token",
             "content_base64", "points"}
_MAX_AUDIT_TEXT = 500


class CreateKeyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    owner: str = Field(min_length=1, max_length=256)
    """the user the key acts as"""
    role: Literal["admin", "researcher", "viewer"] = "researcher"
    scopes: list[str] | None = Field(None, max_length=len(PERMISSIONS))
    """permissions to narrow the role to; all of the role's when left out"""
    name: str | None = Field(None, max_length=256)
    """what the key is for"""
    expires_in_days: int | None = Field(None, ge=1, le=3650)


class KeyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key_id: str = Field(min_length=1, max_length=64)


class ListKeysParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    owner: str | None = Field(None, max_length=256)
    include_revoked: bool = False


class AuditParams(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    principal: str | None = Field(None, max_length=256)
    method: str | None = Field(None, max_length=128)
    target: str | None = Field(None, max_length=256)
    outcome: Literal["ok", "error"] | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = Field(50, ge=1, le=1000)
    cursor: int | None = Field(None, ge=1)
    """the `next_cursor` of the previous page"""


def _key_view(key: ApiKey) -> dict[str, Any]:
    return {"key_id": key.id, "prefix": key.prefix, "owner": key.owner, "role": key.role, "scopes": key.scopes,
            "name": key.name, "created_by": key.created_by, "created_at": key.created_at,
            "expires_at": key.expires_at, "revoked_at": key.revoked_at, "last_used_at": key.last_used_at}


@registry.method("auth.create_api_key", params=CreateKeyParams, mutates=True, permission="admin:keys",
                 summary="Issue an API key (shown in this reply only; stored hashed)")
def create_api_key(p: CreateKeyParams, ctx: Any) -> dict[str, Any]:
    try:
        Principal.of(p.owner, p.role, p.scopes)
    except ValueError as e:
        raise RPCError(INVALID_PARAMS, f"invalid params: scopes: {e}", {"field": "scopes"}) from None
    key = new_api_key()
    row = ApiKey(key_hash=hash_api_key(key), prefix=key[:10], owner=p.owner, role=p.role, scopes=p.scopes or [],
                 name=p.name, created_by=current_principal().subject,
                 expires_at=utcnow() + timedelta(days=p.expires_in_days) if p.expires_in_days else None)
    with db.session_scope(ctx.engine) as s:
        s.add(row)
        s.flush()
        view = _key_view(row)
    return {**view, "api_key": key}


@registry.method("auth.list_api_keys", params=ListKeysParams, permission="admin:keys",
                 summary="API keys (never the keys themselves)")
def list_api_keys(p: ListKeysParams, ctx: Any) -> dict[str, Any]:
    with Session(ctx.engine) as s:
        query = select(ApiKey).order_by(ApiKey.created_at.desc())
        if p.owner is not None:
            query = query.where(ApiKey.owner == p.owner)
        if not p.include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        return {"keys": [_key_view(k) for k in s.exec(query).all()]}


@registry.method("auth.revoke_api_key", params=KeyParams, mutates=True, permission="admin:keys",
                 errors=(NOT_FOUND,), summary="Revoke an API key; it is refused from the next request on")
def revoke_api_key(p: KeyParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        key = s.get(ApiKey, p.key_id)
        if key is None:
            raise RPCError(NOT_FOUND, f"API key not found: {p.key_id}", {"key_id": p.key_id})
        if key.revoked_at is None:
            key.revoked_at = utcnow()
            s.add(key)
        return {"key_id": key.id, "revoked_at": key.revoked_at}


class _None(BaseModel):
    model_config = ConfigDict(extra="forbid")


@registry.method("auth.whoami", params=_None, permission=AUTHENTICATED,
                 summary="The caller as the API sees them: subject, role, permissions")
def whoami(p: _None, ctx: Any) -> dict[str, Any]:
    me = current_principal()
    return {"subject": me.subject, "role": me.role, "permissions": sorted(me.permissions),
            "auth_method": me.auth_method, "key_id": me.key_id}


@registry.method("audit.query", params=AuditParams, permission="admin:audit",
                 summary="Audit log entries, newest first, with filters and cursor pagination")
def audit_query(p: AuditParams, ctx: Any) -> dict[str, Any]:
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(p.limit + 1)
    for column, value in ((AuditEntry.principal, p.principal), (AuditEntry.method, p.method),
                          (AuditEntry.target, p.target), (AuditEntry.outcome, p.outcome)):
        if value is not None:
            query = query.where(column == value)
    if p.since is not None:
        query = query.where(AuditEntry.created_at >= _aware(p.since))
    if p.until is not None:
        query = query.where(AuditEntry.created_at < _aware(p.until))
    if p.cursor is not None:
        query = query.where(AuditEntry.id < p.cursor)
    with Session(ctx.engine) as s:
        rows = list(s.exec(query).all())
    more = len(rows) > p.limit
    rows = rows[: p.limit]
    entries = [{"id": r.id, "created_at": r.created_at, "principal": r.principal, "auth_method": r.auth_method,
                "method": r.method, "target": r.target, "params": r.params, "outcome": r.outcome,
                "error_code": r.error_code, "client_ip": r.client_ip, "request_id": r.request_id} for r in rows]
    return {"entries": entries, "next_cursor": rows[-1].id if more else None, "has_more": more}


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


# ---- the audit observer ------------------------------------------------------------------------

def _redact(params: BaseModel | None) -> dict[str, Any]:
    if params is None:
        return {}
    out: dict[str, Any] = {}
    for key, value in params.model_dump(mode="json").items():
        if key in _LEFT_OUT:
            out[key] = f"<{len(value)} items>" if isinstance(value, list) else "<redacted>"
        elif isinstance(value, str) and len(value) > _MAX_AUDIT_TEXT:
            out[key] = value[:_MAX_AUDIT_TEXT] + "..."
        elif isinstance(value, dict | list) and len(str(value)) > 4 * _MAX_AUDIT_TEXT:
            out[key] = "<too large>"
        else:
            out[key] = value
    return out


def _target(record: CallRecord) -> str | None:
    for source in (record.params, record.result):
        if source is None:
            continue
        data = source if isinstance(source, dict) else getattr(source, "__dict__", {})
        for name in ("job_id", "key_id", "checkpoint_id", "id", "run_id", "dataset_id", "experiment_id", "model_id"):
            value = data.get(name)
            if isinstance(value, str):
                return value[:256]
    return None


def write_audit(engine: Any, record: CallRecord) -> None:
    state = _request_state()
    principal = state.principal if state is not None else None
    entry = AuditEntry(
        principal=principal.subject if principal else "anonymous",
        auth_method=principal.auth_method if principal else "none",
        method=record.name[:128], target=_target(record), params=_redact(record.params),
        outcome="ok" if record.error is None else "error", error_code=record.code or None,
        client_ip=state.client_ip if state else None, request_id=state.request_id if state else None,
    )
    with db.session_scope(engine) as s:
        s.add(entry)


async def audit_observer(record: CallRecord) -> None:
    """Registry observer: one audit row per state-changing call, written off the event loop."""
    if record.method is None or not record.method.mutates:
        return
    state = _request_state()
    ctx = getattr(state, "services", None)
    if ctx is None:
        return
    try:
        await asyncio.to_thread(write_audit, ctx.engine, record)
    except SQLAlchemyError:
        # The call itself already happened; losing its audit row must be loud, not fatal.
        log.exception("could not write the audit entry of %s", record.name)


registry.add_observer(audit_observer)
