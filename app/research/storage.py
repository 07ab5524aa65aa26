"""Content-addressed storage of dataset files: a file is stored once, under its SHA-256.

The default root is `RAYGRPO_HOME/datasets` (file://); `RAYGRPO_DATASET_STORAGE_URL` may name any
fsspec URL instead (`s3://bucket/prefix` with s3fs installed; `memory://` in tests). A file is
first written to a local temporary file while it is hashed (uploads are streamed, never held in
memory), then moved (file://) or copied (fsspec) to `<root>/<sha[:2]>/<sha>`. Its statistics
(rows, schema) are computed from that local copy by `inspect_jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1 << 20
MAX_FILE_BYTES = 10 * 2**30


class StorageError(Exception):
    """A file that cannot be stored or read; the message says why (and names the field when it is the input's)."""


@dataclass
class Stats:
    content_hash: str
    size_bytes: int
    sample_count: int
    schema: dict[str, str]


_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null",
               dict: "object", list: "array"}


def inspect_jsonl(path: Path) -> tuple[int, dict[str, str]]:
    """(rows, field -> JSON type) of a JSONL file of objects; StorageError naming the first bad line."""
    rows, schema = 0, {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as e:
                raise StorageError(f"line {lineno}: not JSON ({str(e)[:100]})") from None
            if not isinstance(row, dict):
                raise StorageError(f"line {lineno}: a JSONL dataset row must be an object")
            rows += 1
            for key, value in row.items():
                kind = _JSON_TYPES.get(type(value), "unknown")
                seen = schema.get(key)
                if seen is None:
                    schema[key] = kind
                elif kind not in seen.split("|"):
                    schema[key] = "|".join(sorted({*seen.split("|"), kind}))
    if rows == 0:
        raise StorageError("the file has no rows")
    return rows, schema


class Storage:
    """Where dataset files live: a local folder or an fsspec URL."""

    def __init__(self, root: str, local_tmp: Path):
        self.root = root.rstrip("/")
        self.local_tmp = local_tmp
        self.is_local = self.root.startswith("file://")
        if not self.is_local:
            try:
                import fsspec
            except ImportError:
                raise StorageError(f"dataset storage {self.root!r} needs fsspec: pip install fsspec "
                                   "(and the protocol's package, e.g. s3fs for s3://)") from None
            try:
                self.fs, self.base = fsspec.core.url_to_fs(self.root)
            except (ImportError, ValueError) as e:
                raise StorageError(f"dataset storage {self.root!r} is not usable: {e}") from None

    @classmethod
    def from_settings(cls, settings: Any) -> Storage:
        root = settings.dataset_storage_url or (settings.home / "datasets").resolve().as_uri()
        return cls(root, settings.home / "datasets" / "tmp")

    def url_of(self, content_hash: str) -> str:
        return f"{self.root}/{content_hash[:2]}/{content_hash}"

    def _local_path(self, url: str) -> Path:
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(url).path))

    @contextmanager
    def _staging(self) -> Iterator[tuple[BinaryIO, Path]]:
        self.local_tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.local_tmp, suffix=".part")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f, path
        finally:
            path.unlink(missing_ok=True)

    def _commit(self, path: Path) -> Stats:
        """Hash and inspect the staged file, then put it at its content address."""
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        content_hash, size = digest.hexdigest(), path.stat().st_size
        rows, schema = inspect_jsonl(path)
        url = self.url_of(content_hash)
        if self.is_local:
            target = self._local_path(url)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.replace(path, target)
        else:
            remote = f"{self.base.rstrip('/')}/{content_hash[:2]}/{content_hash}"
            if not self.fs.exists(remote):
                self.fs.put_file(str(path), remote)
        return Stats(content_hash, size, rows, schema)

    def put_bytes(self, data: bytes) -> Stats:
        with self._staging() as (f, path):
            f.write(data)
            f.close()
            return self._commit(path)

    async def put_stream(self, chunks: AsyncIterator[bytes]) -> Stats:
        """Store an upload as it arrives (the HTTP route's body)."""
        import asyncio

        with self._staging() as (f, path):
            size = 0
            async for chunk in chunks:
                size += len(chunk)
                if size > MAX_FILE_BYTES:
                    raise StorageError(f"file: larger than {MAX_FILE_BYTES} bytes")
                f.write(chunk)
            f.close()
            return await asyncio.to_thread(self._commit, path)

    def exists(self, url: str) -> bool:
        if self.is_local:
            return self._local_path(url).is_file()
        return self.fs.exists(self._remote(url))

    def _remote(self, url: str) -> str:
        return self.fs._strip_protocol(url)

    @contextmanager
    def open(self, url: str) -> Iterator[BinaryIO]:
        if url.startswith("file://"):
            with self._local_path(url).open("rb") as f:
                yield f
        else:
            if self.is_local:
                raise StorageError(f"{url} is not in this server's storage ({self.root})")
            with self.fs.open(self._remote(url), "rb") as f:
                yield f

    def hash_of(self, url: str) -> str:
        """The SHA-256 of the stored file as it is now (a changed file no longer matches its version)."""
        digest = hashlib.sha256()
        with self.open(url) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def copy_to(self, url: str, target: Path) -> None:
        with self.open(url) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
