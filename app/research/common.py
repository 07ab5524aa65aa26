"""What every research-registry namespace shares: list params (cursor, filters), keyset pagination,
who may see an object, tags and collaborators.

Access: an object's owner and its collaborators may read and write it, admins may do anything, and
everyone else is told "not found" (exactly like a missing id), so ids of other users' work do not
leak. Runs, metric series and evaluations are reached through their experiment and share its access.
Deleting is a soft delete (`deleted_at`): runs, versions and evaluations that refer to an object
keep their meaning, and a deleted object answers "not found".
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import and_, delete, or_, select
from sqlmodel import Session, col

from app.api.auth import current_principal
from app.api.jsonrpc import FORBIDDEN, INVALID_PARAMS, NOT_FOUND, RPCError
from app.data.tables import RegistryMember, RegistryTag, utcnow

TAG_MAX = 64


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, populate_by_name=True)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        # PostgreSQL text cannot hold NUL; refuse it here, naming the field, rather than fail in the database
        if _has_nul(v):
            raise ValueError("must not contain NUL characters")
        return v


def _clean_labels(values: list[str] | None, what: str, max_len: int) -> list[str] | None:
    if values is None:
        return None
    out = list(dict.fromkeys(v.strip() for v in values))
    for v in out:
        if not v or len(v) > max_len:
            raise ValueError(f"each {what} must have 1 to {max_len} characters")
    return out


class Labels(Strict):
    """Tags and collaborators, shared by experiments, models, datasets and templates."""

    tags: list[str] | None = Field(None, max_length=50)
    """labels for filtering (1-64 characters each, duplicates dropped)"""
    collaborators: list[str] | None = Field(None, max_length=100)
    """users who may read and write the object besides its owner"""

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str] | None) -> list[str] | None:
        return _clean_labels(v, "tag", TAG_MAX)

    @field_validator("collaborators")
    @classmethod
    def _collaborators(cls, v: list[str] | None) -> list[str] | None:
        return _clean_labels(v, "collaborator", 256)


class ListParams(Strict):
    """Filters and the page of every registry list."""

    owner: str | None = Field(None, max_length=256)
    """only objects of this owner"""
    tag: str | None = Field(None, max_length=TAG_MAX)
    """only objects with this tag"""
    status: str | None = Field(None, max_length=16)
    """only objects in this state"""
    search: str | None = Field(None, min_length=1, max_length=256)
    """case-insensitive text the name contains"""
    limit: int = Field(20, ge=1, le=100)
    """objects per page"""
    cursor: str | None = Field(None, max_length=1000)
    """next_cursor of the previous page"""


class IdParams(Strict):
    id: str = Field(min_length=1, max_length=64)
    """the object's id"""


# ---- access ------------------------------------------------------------------------------------

def not_found(kind: str, object_id: str) -> RPCError:
    return RPCError(NOT_FOUND, f"{kind} not found: {object_id}", {"id": object_id})


def may_access(obj: Any) -> bool:
    me = current_principal()
    return me.is_admin or obj.owner == me.subject or me.subject in (obj.collaborators or [])


def get_visible(session: Session, table: type, object_id: str, kind: str, *, lock: bool = False) -> Any:
    """The live object if the caller may see it; -32001 otherwise (missing, deleted or someone else's)."""
    query = select(table).where(table.id == object_id)
    if lock:  # serialise writers of counters (run numbers, versions); SQLite's IMMEDIATE does it anyway
        query = query.with_for_update()
    obj = session.execute(query).scalars().first()
    if obj is None or obj.deleted_at is not None or not may_access(obj):
        raise not_found(kind, object_id)
    return obj


def set_labels(session: Session, kind: str, obj: Any, *, tags: list[str] | None,
               collaborators: list[str] | None) -> None:
    """Replace the object's tags and/or collaborators (None: leave as they are), row copy and index rows."""
    if tags is not None:
        obj.tags = tags
        session.execute(delete(RegistryTag).where(RegistryTag.kind == kind, RegistryTag.object_id == obj.id))
        session.add_all(RegistryTag(kind=kind, object_id=obj.id, tag=t) for t in tags)
    if collaborators is not None:
        obj.collaborators = collaborators
        session.execute(delete(RegistryMember).where(RegistryMember.kind == kind,
                                                     RegistryMember.object_id == obj.id))
        session.add_all(RegistryMember(kind=kind, object_id=obj.id, subject=c) for c in collaborators)


def require_owner(obj: Any, action: str) -> None:
    me = current_principal()
    if not (me.is_admin or obj.owner == me.subject):
        raise RPCError(FORBIDDEN, f"forbidden: only the owner ({obj.owner}) may {action}",
                       {"id": obj.id, "owner": obj.owner})


def apply_update(session: Any, kind: str, obj: Any, p: Any, fields: tuple[str, ...]) -> None:
    """Copy the `fields` of an update's params that were sent onto `obj`, with its tags and collaborators
    (collaborators only by the owner or an admin), and mark it updated."""
    if p.collaborators is not None:
        require_owner(obj, "change the collaborators")
    for field in fields:
        if getattr(p, field) is not None:
            setattr(obj, field, getattr(p, field))
    set_labels(session, kind, obj, tags=p.tags, collaborators=p.collaborators)
    touch(obj)
    session.add(obj)


def soft_delete(session: Any, obj: Any) -> dict[str, Any]:
    """Mark `obj` deleted (its owner or an admin only); what refers to it keeps working."""
    require_owner(obj, "delete it")
    obj.deleted_at = utcnow()
    session.add(obj)
    return {"id": obj.id, "deleted": True, "deleted_at": obj.deleted_at}


def touch(obj: Any) -> None:
    obj.updated_at = utcnow()


# ---- lists -------------------------------------------------------------------------------------

def _encode_cursor(obj: Any) -> str:
    raw = json.dumps({"t": obj.created_at.isoformat(), "id": obj.id}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        created_at, object_id = datetime.fromisoformat(data["t"]), data["id"]
        if not isinstance(object_id, str):
            raise TypeError("id")
    except (binascii.Error, ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        raise RPCError(INVALID_PARAMS, f"invalid params: cursor: not a cursor this API returned "
                       f"({e.__class__.__name__})", {"field": "cursor"}) from None
    return (created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC)), object_id


def like_pattern(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def page(session: Session, query: Any, table: type, p: ListParams, *, kind: str | None,
         view: Any, key: str) -> dict[str, Any]:
    """One page of `query` newest first, with the common filters applied.

    Keyset pagination on (created_at, id), served by each table's (created_at, id) index: a page never
    repeats or skips an object when others are added. `kind` set: the object has owner, tags and
    collaborators, and a non-admin caller sees only what they own or collaborate on."""
    me = current_principal()
    if kind is not None:
        query = query.where(col(table.deleted_at).is_(None))
        if p.owner is not None:
            query = query.where(table.owner == p.owner)
        if p.tag is not None:
            tagged = select(RegistryTag.object_id).where(RegistryTag.kind == kind, RegistryTag.tag == p.tag)
            query = query.where(col(table.id).in_(tagged))
        if not me.is_admin:
            shared = select(RegistryMember.object_id).where(RegistryMember.kind == kind,
                                                            RegistryMember.subject == me.subject)
            query = query.where(or_(table.owner == me.subject, col(table.id).in_(shared)))
    if p.status is not None and hasattr(table, "status"):
        query = query.where(table.status == p.status)
    if p.search is not None and hasattr(table, "name"):
        query = query.where(col(table.name).ilike(like_pattern(p.search), escape="\\"))
    if p.cursor is not None:
        created_at, object_id = _decode_cursor(p.cursor)
        query = query.where(or_(col(table.created_at) < created_at,
                                and_(col(table.created_at) == created_at, col(table.id) < object_id)))
    query = query.order_by(col(table.created_at).desc(), col(table.id).desc()).limit(p.limit + 1)
    rows = list(session.execute(query).scalars())
    items = rows[: p.limit]
    more = len(rows) > p.limit
    return {key: [view(r) for r in items], "next_cursor": _encode_cursor(items[-1]) if more else None,
            "has_more": more}


def invalid(field: str, message: str, code: int = INVALID_PARAMS, **data: Any) -> RPCError:
    prefix = "invalid params: " if code == INVALID_PARAMS else ""
    return RPCError(code, f"{prefix}{field}: {message}", {"field": field, **data})
