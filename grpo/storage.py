"""Where a run's files live: a local folder (one node, or a mount every node shares) or a URL that
pyarrow's filesystems know (`s3://bucket/prefix`, `gs://`, `abfs://`, `hdfs://`).

A URL is opened with `pyarrow.fs.FileSystem.from_uri`, which takes the standard variables of its cloud
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, ...): the same
config then works on a real bucket and on an S3-compatible server, and no credential is ever in a config,
a Ray Job's metadata or its runtime_env. Ray Train writes the checkpoints through the same filesystem.

Inputs (model, tokenizer, dataset) given as URLs are copied once per node into a local cache
(`local_copy`), since `from_pretrained` and the sharded loader read local files; a local input of a run
whose storage is a URL is uploaded by the driver under `<run>/inputs/` first (`stage_inputs` in grpo.run),
so no worker needs a path that exists only on the head node.

Not here: what a checkpoint holds (grpo.trainer), the API's dataset store (app.research.storage).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

CACHE_ENV = "RAYGRPO_CACHE"


def is_url(location: str | os.PathLike) -> bool:
    """`scheme://...` (a Windows drive letter is not a scheme); `file://` counts as local."""
    s = str(location)
    return "://" in s and not s.startswith("file://") and len(s.split("://", 1)[0]) > 1


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or URL."""
    s = str(location)
    if not is_url(s):
        local = Path(s.removeprefix("file://")).expanduser().resolve()
        return pafs.LocalFileSystem(), str(local)
    try:
        return pafs.FileSystem.from_uri(s)
    except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError
        raise ValueError(f"{s}: not a storage URL pyarrow can open ({e})") from None


def join(location: str, *names: str) -> str:
    """`location/name/...` for a local path or a URL."""
    if not is_url(location):
        return str(Path(location).joinpath(*names))
    return "/".join([location.rstrip("/"), *names])


def url_of(fs: pafs.FileSystem | None, path: str) -> str:
    """The URL (or local path) of `path` in `fs`: Ray Train's checkpoints carry (filesystem, path)."""
    if fs is None or isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{fs.type_name}://{path}"


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def size(location: str) -> int | None:
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def listdir(location: str) -> list[str]:
    """The names directly under a folder (none when it does not exist)."""
    fs, path = resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(i.base_name for i in infos)


def sizes(location: str) -> dict[str, int]:
    """name -> size of the files directly under a folder (one listing: one request on an object store)."""
    fs, path = resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str, data: bytes) -> None:
    """The whole file at once (an object store has no append; a local file is replaced atomically)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload(local: Path, location: str) -> None:
    """A local file or folder to `location` (a folder's files keep their relative paths)."""
    fs, path = resolve(location)
    fs.create_dir(path if local.is_dir() else path.rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(str(local), path, destination_filesystem=fs)


def download(location: str, local: Path) -> None:
    """A file or folder at `location` to the local path `local`."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        local.mkdir(parents=True, exist_ok=True)
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "raygrpo").expanduser()


def local_copy(location: str) -> str:
    """A local path holding `location`'s file or folder: itself when local, else this node's cached copy.
    The copy is made once per node and URL (a lock file keeps two processes of a node from both
    downloading; a half-made copy is never used: it is renamed into place when complete)."""
    if not is_url(location):
        return location
    key = hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:20]
    name = location.rstrip("/").rsplit("/", 1)[-1] or "input"
    root = cache_root() / "inputs"
    target = root / f"{key}-{name}"
    if target.exists():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
            try:
                download(location, tmp / name)
                (tmp / name).rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def same_file(local: Path, location: str) -> bool:
    """Whether `location` already holds a file of `local`'s size (a staged input is not uploaded twice)."""
    with contextlib.suppress(OSError, ValueError):
        return size(location) == local.stat().st_size
    return False
