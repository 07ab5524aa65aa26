"""`datasets.*`: datasets with immutable versions, their files, and signed upload/download links.

A version is a JSONL file fixed by its SHA-256 (`content_hash`), with its row count, the fields
seen in its rows and a change description. Its file is stored once per content (app.research.storage).
Files arrive either as base64 in `datasets.create_version` (small files: the JSON-RPC body is at most
10 MB) or through HTTP, streamed:

    PUT /api/v1/datasets/{dataset_id}/file                      -> {content_hash, ...}; then
    datasets.create_version {dataset_id, content_hash}          -> version n
    GET /api/v1/datasets/{dataset_id}/versions/{n}/file         -> the file

Both routes take the same credentials as the JSON-RPC endpoint, or instead a signed link from
`datasets.upload_url` / `datasets.download_url`: HMAC-SHA256 (the server's JWT HS256 key) over the
method, path, expiry and the user who asked for it. A link is a capability for that one operation
until it expires (at most a day).

Before a version's file is used (download, training) its hash is checked: a file changed in storage
is refused, not silently used.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select
from sqlmodel import Session, col

from app.api.auth import authenticate, current_principal, hs256_secret, request_state
from app.api.context import registry
from app.api.jsonrpc import FORBIDDEN, NOT_FOUND, UNAUTHENTICATED, VALIDATION_FAILED, RPCError
from app.data import db
from app.data.tables import Dataset, DatasetUpload, DatasetVersion
from app.research.common import (
    IdParams,
    Labels,
    ListParams,
    Strict,
    apply_update,
    get_visible,
    invalid,
    may_access,
    page,
    set_labels,
    soft_delete,
    touch,
)
from app.research.storage import Storage, StorageError


class Message(BaseModel):
    """One turn of a prompt conversation (OpenAI-style)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=100_000)


class Row(BaseModel):
    """One training or evaluation example: a query, or a conversation ending with a user turn."""

    model_config = ConfigDict(extra="forbid")
    query: str | None = Field(None, min_length=1, max_length=100_000, validation_alias=AliasChoices("query", "prompt"))
    """the prompt; with `messages`, their last user turn (what rewards see)"""
    messages: list[Message] | None = Field(None, min_length=1, max_length=256)
    """instead of `query`: the conversation the policy is prompted with, through the model's chat template"""
    expected_outcome: str = Field(max_length=100_000, validation_alias=AliasChoices("expected_outcome", "answer"))
    """what the reward function compares the completion with"""

    @model_validator(mode="after")
    def _one_prompt(self) -> Row:
        if (self.query is None) == (self.messages is None):
            raise ValueError("give exactly one of query and messages")
        if self.messages is not None:
            if self.messages[-1].role != "user":
                raise ValueError(f"messages must end with a user turn, got {self.messages[-1].role!r}")
            self.query = self.messages[-1].content
        return self

    def engine_row(self) -> dict[str, Any]:
        """The row as the engine's jsonl task reads it."""
        row: dict[str, Any] = {"query": self.query, "expected_outcome": self.expected_outcome}
        if self.messages is not None:
            row["messages"] = [m.model_dump() for m in self.messages]
        return row



KIND = "dataset"
READ, WRITE = "datasets:read", "datasets:write"
MAX_LINK_S = 86_400


def dataset_view(d: Dataset) -> dict[str, Any]:
    return {"id": d.id, "name": d.name, "description": d.description, "owner": d.owner,
            "collaborators": d.collaborators, "tags": d.tags, "status": d.status,
            "latest_version": d.latest_version or None, "created_at": d.created_at, "updated_at": d.updated_at}


def version_view(v: DatasetVersion) -> dict[str, Any]:
    return {"dataset_id": v.dataset_id, "version": v.version, "content_hash": v.content_hash,
            "size_bytes": v.size_bytes, "sample_count": v.sample_count, "schema": v.row_schema,
            "change_description": v.change_description, "storage_url": v.storage_url,
            "created_by": v.created_by, "created_at": v.created_at}


def get_dataset(s: Session, dataset_id: str, *, lock: bool = False) -> Dataset:
    return get_visible(s, Dataset, dataset_id, KIND, lock=lock)


def get_version(s: Session, d: Dataset, version: int | None) -> DatasetVersion:
    n = version or d.latest_version
    v = s.get(DatasetVersion, (d.id, n)) if n else None
    if v is None:
        what = f"version {n}" if n else "versions yet"
        raise RPCError(NOT_FOUND, f"version: dataset {d.id} has no {what}", {"field": "version"})
    return v


def _storage(ctx: Any) -> Storage:
    try:
        return Storage.from_settings(ctx.settings)
    except StorageError as e:
        raise RPCError(VALIDATION_FAILED, f"storage: {e}", {"field": "storage"}) from None


def verified_copy(ctx: Any, v: DatasetVersion, target: Path) -> None:
    """Copy a version's file to `target`, refusing it when its content no longer matches the version."""
    storage = _storage(ctx)
    try:
        storage.copy_to(v.storage_url, target)
    except (OSError, StorageError) as e:
        raise RPCError(VALIDATION_FAILED, f"dataset: file of {v.dataset_id} version {v.version} is unreadable: "
                       f"{type(e).__name__}", {"field": "dataset"}) from None
    actual = _sha256(target)
    if actual != v.content_hash:
        target.unlink(missing_ok=True)
        raise RPCError(VALIDATION_FAILED, f"dataset: the stored file of {v.dataset_id} version {v.version} has "
                       f"changed (sha256 {actual[:12]}..., the version has {v.content_hash[:12]}...)",
                       {"field": "dataset", "expected_hash": v.content_hash, "actual_hash": actual})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---- datasets ----------------------------------------------------------------------------------

class CreateDataset(Labels):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = Field(None, max_length=100_000)


class UpdateDataset(Labels):
    id: str = Field(min_length=1, max_length=64)
    name: str | None = Field(None, min_length=1, max_length=256)
    description: str | None = Field(None, max_length=100_000)


@registry.method("datasets.create", params=CreateDataset, mutates=True, permission=WRITE,
                 summary="Create a dataset (no versions yet)")
def create_dataset(p: CreateDataset, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        d = Dataset(name=p.name, description=p.description, owner=current_principal().subject)
        s.add(d)
        set_labels(s, KIND, d, tags=p.tags or [], collaborators=p.collaborators or [])
        s.flush()
        return dataset_view(d)


@registry.method("datasets.get", params=IdParams, permission=READ, errors=(NOT_FOUND,),
                 summary="A dataset, with its latest version")
def get_dataset_method(p: IdParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        d = get_dataset(s, p.id)
        latest = version_view(get_version(s, d, None)) if d.latest_version else None
        return {**dataset_view(d), "latest": latest}


@registry.method("datasets.update", params=UpdateDataset, mutates=True, permission=WRITE,
                 errors=(NOT_FOUND, FORBIDDEN), summary="Change a dataset's name, description, tags or collaborators")
def update_dataset(p: UpdateDataset, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        d = get_dataset(s, p.id, lock=True)
        apply_update(s, KIND, d, p, ("name", "description"))
        return dataset_view(d)


@registry.method("datasets.delete", params=IdParams, mutates=True, permission=WRITE,
                 errors=(NOT_FOUND, FORBIDDEN),
                 summary="Delete a dataset (soft: its versions and files stay for the jobs that used them)")
def delete_dataset(p: IdParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        d = get_dataset(s, p.id, lock=True)
        return soft_delete(s, d)


@registry.method("datasets.list", params=ListParams, permission=READ,
                 summary="Datasets the caller may see, newest first (filters, cursor)")
def list_datasets(p: ListParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        return page(s, select(Dataset), Dataset, p, kind=KIND, view=dataset_view, key="datasets")


# ---- versions ----------------------------------------------------------------------------------

class CreateVersion(Strict):
    dataset_id: str = Field(min_length=1, max_length=64)
    content_base64: str | None = Field(None, min_length=1)
    """the JSONL file, base64-encoded (small files; larger ones go through the upload route)"""
    content_hash: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    """the SHA-256 an upload (PUT .../file) answered with"""
    change_description: str | None = Field(None, max_length=10_000)
    """what changed since the previous version"""

    @model_validator(mode="after")
    def _one_source(self) -> CreateVersion:
        if (self.content_base64 is None) == (self.content_hash is None):
            raise ValueError("give exactly one of content_base64 and content_hash")
        return self


class VersionParams(Strict):
    dataset_id: str = Field(min_length=1, max_length=64)
    version: int | None = Field(None, ge=1, le=2**31 - 1)
    """a version number; the latest when left out"""


class ListVersions(Strict):
    dataset_id: str = Field(min_length=1, max_length=64)
    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=20)
    """next_cursor of the previous page"""


def _stats_of_upload(storage: Storage, content_hash: str) -> dict[str, Any]:
    """Row count and schema of a file uploaded earlier through the HTTP route (read back from storage)."""
    from app.research.storage import inspect_jsonl

    url = storage.url_of(content_hash)
    if not storage.exists(url):
        raise RPCError(NOT_FOUND, f"content_hash: no uploaded file with sha256 {content_hash}",
                       {"field": "content_hash"})
    local = storage.local_tmp / f"{content_hash}.check"
    storage.local_tmp.mkdir(parents=True, exist_ok=True)
    try:
        storage.copy_to(url, local)
        if _sha256(local) != content_hash:
            raise RPCError(VALIDATION_FAILED, "content_hash: the stored file does not match its hash",
                           {"field": "content_hash"})
        rows, schema = inspect_jsonl(local)
        return {"size_bytes": local.stat().st_size, "sample_count": rows, "schema": schema, "url": url}
    finally:
        local.unlink(missing_ok=True)


def _may_attach(s: Session, dataset_id: str, content_hash: str) -> None:
    """A version attaches a stored file by hash only when this dataset received that upload or a dataset the caller
    may read already holds it; any other hash is "no uploaded file", exactly like one never uploaded (content-
    addressed storage must not turn a leaked hash into a read key)."""
    if s.get(DatasetUpload, (dataset_id, content_hash)) is not None:
        return
    holders = s.execute(select(Dataset).join(DatasetVersion, col(DatasetVersion.dataset_id) == col(Dataset.id))
                        .where(DatasetVersion.content_hash == content_hash)).scalars()
    if any(d.deleted_at is None and may_access(d) for d in holders):
        return
    raise RPCError(NOT_FOUND, f"content_hash: no uploaded file with sha256 {content_hash}", {"field": "content_hash"})


@registry.method("datasets.create_version", params=CreateVersion, mutates=True, permission=WRITE,
                 errors=(NOT_FOUND, VALIDATION_FAILED),
                 summary="Add an immutable version from base64 content or an uploaded file's hash")
def create_version(p: CreateVersion, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        get_dataset(s, p.dataset_id)  # before any storage work: a stranger learns nothing
    storage = _storage(ctx)
    try:
        if p.content_base64 is not None:
            try:
                data = base64.b64decode(p.content_base64, validate=True)
            except (binascii.Error, ValueError):
                raise invalid("content_base64", "not valid base64") from None
            st = storage.put_bytes(data)
            content_hash = st.content_hash
            stats = {"size_bytes": st.size_bytes, "sample_count": st.sample_count, "schema": st.schema,
                     "url": storage.url_of(content_hash)}
        else:
            content_hash = p.content_hash
            with db.session_scope(ctx.engine) as s:
                _may_attach(s, p.dataset_id, content_hash)
            stats = _stats_of_upload(storage, content_hash)
    except StorageError as e:
        field = "content_base64" if p.content_base64 is not None else "content_hash"
        raise RPCError(VALIDATION_FAILED, f"{field}: {e}", {"field": field}) from None
    with db.session_scope(ctx.engine) as s:
        d = get_dataset(s, p.dataset_id, lock=True)
        if d.latest_version:
            latest = get_version(s, d, None)
            if latest.content_hash == content_hash:
                raise RPCError(VALIDATION_FAILED, f"content: unchanged since version {latest.version} "
                               f"(sha256 {content_hash[:12]}...)",
                               {"field": "content", "version": latest.version, "content_hash": content_hash})
        d.latest_version += 1
        touch(d)
        v = DatasetVersion(dataset_id=d.id, version=d.latest_version, content_hash=content_hash,
                           size_bytes=stats["size_bytes"], sample_count=stats["sample_count"],
                           row_schema=stats["schema"], change_description=p.change_description,
                           storage_url=stats["url"], created_by=current_principal().subject)
        s.add_all([d, v])
        s.flush()
        return version_view(v)


@registry.method("datasets.get_version", params=VersionParams, permission=READ, errors=(NOT_FOUND,),
                 summary="One version of a dataset (the latest by default)")
def get_version_method(p: VersionParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        return version_view(get_version(s, get_dataset(s, p.dataset_id), p.version))


@registry.method("datasets.list_versions", params=ListVersions, permission=READ, errors=(NOT_FOUND,),
                 summary="Versions of a dataset, newest first, with cursor pagination")
def list_versions(p: ListVersions, ctx: Any) -> dict[str, Any]:
    below = None
    if p.cursor is not None:
        if not p.cursor.isdigit():
            raise invalid("cursor", "not a cursor this API returned")
        below = int(p.cursor)
    with db.session_scope(ctx.engine) as s:
        get_dataset(s, p.dataset_id)
        query = select(DatasetVersion).where(DatasetVersion.dataset_id == p.dataset_id)
        if below is not None:
            query = query.where(col(DatasetVersion.version) < below)
        rows = list(s.execute(query.order_by(col(DatasetVersion.version).desc()).limit(p.limit + 1)).scalars())
    items, more = rows[: p.limit], len(rows) > p.limit
    return {"versions": [version_view(v) for v in items], "next_cursor": str(items[-1].version) if more else None,
            "has_more": more}


@registry.method("datasets.verify", params=VersionParams, permission=READ, errors=(NOT_FOUND, VALIDATION_FAILED),
                 summary="Re-hash a version's stored file: does it still match the version's content_hash?")
def verify_version(p: VersionParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        v = get_version(s, get_dataset(s, p.dataset_id), p.version)
    try:
        actual = _storage(ctx).hash_of(v.storage_url)
    except (OSError, StorageError) as e:
        raise RPCError(VALIDATION_FAILED, f"dataset: the file is unreadable: {type(e).__name__}",
                       {"field": "dataset"}) from None
    return {"dataset_id": v.dataset_id, "version": v.version, "content_hash": v.content_hash,
            "actual_hash": actual, "ok": actual == v.content_hash}


# ---- signed links ------------------------------------------------------------------------------

class LinkParams(Strict):
    dataset_id: str = Field(min_length=1, max_length=64)
    expires_in_s: int = Field(900, ge=1, le=MAX_LINK_S)
    """how long the link works"""


class DownloadLinkParams(LinkParams):
    version: int | None = Field(None, ge=1, le=2**31 - 1)
    """a version number; the latest when left out"""


def upload_path(dataset_id: str) -> str:
    return f"/api/v1/datasets/{dataset_id}/file"


def download_path(dataset_id: str, version: int) -> str:
    return f"/api/v1/datasets/{dataset_id}/versions/{version}/file"


def _signature(settings: Any, method: str, path: str, expires: int, subject: str) -> str:
    message = f"{method}\n{path}\n{expires}\n{subject}".encode()
    return hmac.new(hs256_secret(settings).encode(), message, hashlib.sha256).hexdigest()


def signed_link(settings: Any, method: str, path: str, expires_in_s: int) -> dict[str, Any]:
    from urllib.parse import urlencode

    expires = int(time.time()) + expires_in_s
    subject = current_principal().subject
    query = urlencode({"expires": expires, "by": subject,
                       "signature": _signature(settings, method, path, expires, subject)})
    return {"method": method, "url": f"{path}?{query}", "expires_at": datetime.fromtimestamp(expires, UTC)}


@registry.method("datasets.upload_url", params=LinkParams, permission=WRITE, errors=(NOT_FOUND,),
                 summary="A signed, expiring link to PUT a file for a dataset (no other credentials needed)")
def upload_url(p: LinkParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        get_dataset(s, p.dataset_id)
    return signed_link(ctx.settings, "PUT", upload_path(p.dataset_id), p.expires_in_s)


@registry.method("datasets.download_url", params=DownloadLinkParams, permission=READ, errors=(NOT_FOUND,),
                 summary="A signed, expiring link to GET a version's file")
def download_url(p: DownloadLinkParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        v = get_version(s, get_dataset(s, p.dataset_id), p.version)
    link = signed_link(ctx.settings, "GET", download_path(v.dataset_id, v.version), p.expires_in_s)
    return {**link, "version": v.version, "content_hash": v.content_hash}


# ---- training from a version (training.start_grpo's `dataset`) ---------------------------------

def training_rows(ctx: Any, dataset_id: str, version: int | None, work_dir: Path) -> tuple[list[Row], dict[str, Any]]:
    """The rows of a dataset version as training rows, and its lineage {dataset_id, version, content_hash}.
    The caller needs datasets:read on it; the file must still match its hash; every row must be a
    {query|prompt, expected_outcome|answer} object (the first bad one is named)."""
    from pydantic import ValidationError

    me = current_principal()
    if not me.can(READ):
        raise RPCError(FORBIDDEN, f"forbidden: training from a dataset needs the permission {READ}",
                       {"permission": READ})
    with db.session_scope(ctx.engine) as s:
        try:
            v = get_version(s, get_dataset(s, dataset_id), version)
        except RPCError as e:
            raise RPCError(NOT_FOUND, f"dataset: {e.message}", {"field": "dataset"}) from None
    work_dir.mkdir(parents=True, exist_ok=True)
    local = work_dir / f"dataset-{v.content_hash}.jsonl"
    try:
        verified_copy(ctx, v, local)
        rows = []
        with local.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rows.append(Row.model_validate(json.loads(raw)))
                except ValidationError as e:
                    err = e.errors(include_url=False, include_input=False)[0]
                    where = ".".join(str(x) for x in err["loc"]) or "row"
                    raise RPCError(VALIDATION_FAILED, f"dataset: line {lineno}: {where}: {err['msg']}",
                                   {"field": "dataset", "line": lineno}) from None
    finally:
        local.unlink(missing_ok=True)
    return rows, {"dataset_id": v.dataset_id, "version": v.version, "content_hash": v.content_hash}


# ---- HTTP routes (installed by app.api.main) -------------------------------------------------------

def _http_error(status: int, code: int, message: str) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _caller(request: Any, ctx: Any, method: str, permission: str) -> tuple[Any, Any]:
    """(principal, None) for a valid signed link for exactly this method and path, or the usual
    credentials with `permission`; (None, the HTTP error reply) otherwise."""
    from app.api.auth import Principal

    params, path = request.query_params, request.url.path
    if "signature" in params:
        try:
            expires, subject = int(params.get("expires", "")), params.get("by", "")
        except ValueError:
            return None, _http_error(401, UNAUTHENTICATED, "unauthenticated: malformed signed link")
        good = _signature(ctx.settings, method, path, expires, subject)
        if not hmac.compare_digest(good, params["signature"]):
            return None, _http_error(401, UNAUTHENTICATED, "unauthenticated: signature invalid")
        if expires < time.time():
            return None, _http_error(401, UNAUTHENTICATED, "unauthenticated: link expired")
        # the link carries its own permission: exactly this operation, for the user who asked for it
        return Principal(subject=subject, role="link", permissions=frozenset({permission}), auth_method="link"), None
    principal, reason = await asyncio.to_thread(authenticate, ctx.settings, ctx.engine,
                                                request.headers.get("authorization"),
                                                request.headers.get("x-api-key"))
    if principal is None:
        return None, _http_error(401, UNAUTHENTICATED, f"unauthenticated: {reason or 'credentials required'}")
    if not principal.can(permission):
        return None, _http_error(403, FORBIDDEN, f"forbidden: needs the permission {permission}")
    return principal, None


def _dataset_for(ctx: Any, principal: Any, dataset_id: str, version: int | None) -> Any:
    """(dataset, version) as `principal` may see them. A signed link's user could see the dataset when the
    link was made, and the signature binds this dataset's path, so a link needs no ownership check."""
    from app.research.common import not_found

    with db.session_scope(ctx.engine) as s:
        if principal.auth_method == "link":
            d = s.get(Dataset, dataset_id)
            if d is None or d.deleted_at is not None:
                raise not_found(KIND, dataset_id)
        else:
            request_state().principal = principal
            d = get_dataset(s, dataset_id)
        return d, (get_version(s, d, version) if version is not None else None)


def _record_upload(ctx: Any, dataset_id: str, content_hash: str, subject: str) -> None:
    from sqlalchemy.exc import IntegrityError

    try:
        with db.session_scope(ctx.engine) as s:
            if s.get(DatasetUpload, (dataset_id, content_hash)) is None:
                s.add(DatasetUpload(dataset_id=dataset_id, content_hash=content_hash, uploaded_by=subject))
    except IntegrityError:  # the same file uploaded to the same dataset at the same moment: recorded once
        pass


def install_routes(app: Any, ctx: Any) -> None:
    from fastapi.responses import StreamingResponse

    @app.put("/api/v1/datasets/{dataset_id}/file")
    async def put_file(dataset_id: str, request: Request) -> Any:
        principal, refused = await _caller(request, ctx, "PUT", WRITE)
        if refused is not None:
            return refused
        try:
            await asyncio.to_thread(_dataset_for, ctx, principal, dataset_id, None)
            st = await _storage(ctx).put_stream(request.stream())
            await asyncio.to_thread(_record_upload, ctx, dataset_id, st.content_hash, principal.subject)
        except RPCError as e:
            return _http_error(404 if e.code == NOT_FOUND else 400, e.code, e.message)
        except StorageError as e:
            return _http_error(400, VALIDATION_FAILED, f"file: {e}")
        return {"dataset_id": dataset_id, "content_hash": st.content_hash, "size_bytes": st.size_bytes,
                "sample_count": st.sample_count, "schema": st.schema}

    @app.get("/api/v1/datasets/{dataset_id}/versions/{version}/file")
    async def get_file(dataset_id: str, version: int, request: Request) -> Any:
        if not 1 <= version < 2**31:
            return _http_error(404, NOT_FOUND, f"version: no version {version}")
        principal, refused = await _caller(request, ctx, "GET", READ)
        if refused is not None:
            return refused
        try:
            _, v = await asyncio.to_thread(_dataset_for, ctx, principal, dataset_id, version)
            actual = await asyncio.to_thread(_storage(ctx).hash_of, v.storage_url)
        except RPCError as e:
            return _http_error(404 if e.code == NOT_FOUND else 400, e.code, e.message)
        except (OSError, StorageError) as e:
            return _http_error(500, VALIDATION_FAILED, f"file unreadable: {type(e).__name__}")
        if actual != v.content_hash:
            return _http_error(409, VALIDATION_FAILED, f"the stored file of version {v.version} has changed "
                               f"(sha256 {actual[:12]}..., expected {v.content_hash[:12]}...)")
        storage = _storage(ctx)

        def chunks() -> Any:
            with storage.open(v.storage_url) as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        return StreamingResponse(chunks(), media_type="application/x-ndjson", headers={
            "ETag": f'"{v.content_hash}"', "X-Content-SHA256": v.content_hash,
            "Content-Disposition": f'attachment; filename="{dataset_id}-v{v.version}.jsonl"'})
