"""Run untrusted Python (model completions plus test asserts) in a throwaway, limited subprocess.

Layers, outermost first:
  0. a fresh mount namespace in which every mount is read-only but the run's own temporary folder
     (`unshare --mount`, or `unshare -rmn` for non-root users with user namespaces), when the probe at
     first use shows it works here; it comes with layer 1;
  1. a fresh network namespace via `unshare --net` (or `unshare -rn` for non-root users with user
     namespaces), when the probe at first use shows it works on this machine: no interface but a
     downed loopback, so every connect fails in the kernel;
  2. resource limits set in the child before exec: CPU seconds, address space, file size, open
     files, no core dumps;
  3. its own session and process group, so a timeout SIGKILLs the program and anything it forked;
  4. `python -I` (no user site, no PYTHON* variables, no cwd on sys.path) in an empty temporary
     working directory that is deleted afterwards, a minimal environment and stdin closed;
  5. a prelude that replaces `socket.socket`, `socket.create_connection` and `socket.getaddrinfo`
     with versions raising PermissionError. This one is always on but only stops honest mistakes:
     code can still reach `_socket` directly, which is what layer 1 is for.
What it does not do: hide files. With layer 0 the program can still read what the user running it can
read (no chroot), and connect to Unix sockets on disk, which a network namespace does not cover; without
layer 0 (a container that allows no namespaces: `filesystem_isolated()` says) it can also write there.
A child that calls setsid() escapes the process-group kill. Run reward workers as an unprivileged user,
or in a container, when completions may be adversarial.
"""

from __future__ import annotations

import functools
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import IO

OUTPUT_CAP_BYTES = 64 * 1024
"""stdout and stderr are each cut to this many bytes; the rest is read and discarded"""

MAX_FILE_BYTES = 16 * 1024 * 1024
"""largest file the program may write (RLIMIT_FSIZE); bigger writes get SIGXFSZ"""

MAX_OPEN_FILES = 64
"""RLIMIT_NOFILE for the program"""

NETWORK_BLOCKED_MESSAGE = "network access is disabled in the sandbox"

# Runs before the user's code in the same interpreter. The user's code lives in main.py and is run
# by runpy so that its own `from __future__` imports and line numbers stay intact.
_PRELUDE = f"""
import socket as _socket_module

def _blocked(*args, **kwargs):
    raise PermissionError({NETWORK_BLOCKED_MESSAGE!r})

class _BlockedSocket(_socket_module.socket):
    # A subclass, not a function, so modules that subclass socket.socket (ssl) still import.
    def __init__(self, *args, **kwargs):
        _blocked()

_socket_module.socket = _BlockedSocket
_socket_module.SocketType = _BlockedSocket
_socket_module.create_connection = _blocked
_socket_module.getaddrinfo = _blocked
del _socket_module, _BlockedSocket

import runpy, sys
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass
class SandboxResult:
    """What one sandboxed run did. `returncode` is None when the run was killed for timing out."""

    ok: bool
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    file: str | None = None
    """the content of `read_back`, when asked for and written"""


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """The command prefix that puts a process in a fresh network namespace here, or () if none works.

    Probed once per process with the real interpreter: `unshare --net` needs CAP_SYS_ADMIN (root),
    `unshare -rn` works unprivileged where user namespaces are enabled; containers often allow neither.
    """
    for prefix in (("unshare", "--net"), ("unshare", "-rn")):
        try:
            probe = subprocess.run(
                [*prefix, sys.executable, "-I", "-c", "pass"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue  # no unshare binary, or it hung: try the next form, then give up
        if probe.returncode == 0:
            return prefix
    return ()


def netns_available() -> bool:
    """Whether runs get their own network namespace (layer 1) on this machine."""
    return bool(_netns_prefix())


# Run inside a new mount namespace: every mount read-only but the run's own folder ($1), then exec the
# rest of the arguments. Mount points are read from /proc/self/mounts (octal escapes kept, so a path with
# a space is skipped rather than mangled: it stays as it was, which the probe below would not notice,
# hence `set -e` only for the steps that must work).
_READ_ONLY_SCRIPT = r"""
set -e
W="$1"; shift
mount --make-rprivate /
mount --bind "$W" "$W"
cd "$W"  # the working directory was the folder under the new mount: enter the mount
set +e
for m in $(awk '{print $2}' /proc/self/mounts | sort -ru); do
  [ "$m" = "$W" ] || mount -o remount,bind,ro "$m" 2>/dev/null
done
exec "$@"
"""


@functools.cache
def _fs_prefix() -> tuple[str, ...]:
    """A prefix giving the run a new mount and network namespace in which only its own folder is
    writable (passed as the argument after the prefix), or () when this machine allows neither form.
    Probed once per process: the probe must be able to write its folder and unable to write beside it."""
    probe_code = ("import os, sys\n"
                  "open('inside', 'w').write('x')\n"
                  "try:\n    open(os.path.join(os.path.dirname(os.getcwd()), 'raygrpo-outside'), 'w')\n"
                  "except OSError:\n    sys.exit(0)\n"
                  "sys.exit(3)\n")
    for unshare in (("unshare", "--mount", "--net"), ("unshare", "-rmn")):
        prefix = (*unshare, "sh", "-c", _READ_ONLY_SCRIPT, "sh")
        with tempfile.TemporaryDirectory(prefix="raygrpo-sandbox-probe-") as parent:
            workdir = os.path.join(parent, "run")
            os.mkdir(workdir)
            try:
                probe = subprocess.run([*prefix, workdir, sys.executable, "-I", "-c", probe_code], cwd=workdir,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, timeout=20, check=False)
            except (OSError, subprocess.SubprocessError):
                continue
            if probe.returncode == 0 and os.path.exists(os.path.join(workdir, "inside")) \
                    and not os.path.exists(os.path.join(parent, "raygrpo-outside")):
                return prefix
    return ()


def filesystem_isolated() -> bool:
    """Whether runs see a read-only filesystem except their own folder (layer 0) on this machine."""
    return bool(_fs_prefix())


def _limits(timeout_s: float, memory_mb: int):
    """A preexec_fn setting the child's rlimits; it only calls setrlimit, which is fork-safe."""
    cpu_s = math.ceil(timeout_s) + 1  # wall-clock timeout is the real bound; this catches busy loops
    address_space = memory_mb * 1024 * 1024

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_OPEN_FILES, MAX_OPEN_FILES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _drain(stream: IO[bytes], sink: list[bytes]) -> None:
    """Read a pipe to EOF, keeping the first OUTPUT_CAP_BYTES (so a chatty program cannot block)."""
    kept = 0
    while chunk := stream.read1(65536):
        if kept < OUTPUT_CAP_BYTES:
            sink.append(chunk[: OUTPUT_CAP_BYTES - kept])
        kept += len(chunk)
    if kept > OUTPUT_CAP_BYTES:
        sink.append(f"\n[... {kept - OUTPUT_CAP_BYTES} bytes truncated]".encode())


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already gone


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256, files: dict[str, str] | None = None,
               read_back: str | None = None) -> SandboxResult:
    """Run `code` as a Python program under the layers in the module docstring.

    `ok` is True only for exit status 0 within `timeout_s` seconds of wall-clock time. Running out
    of memory shows as a MemoryError (exit 1) or a kill by signal (negative returncode). `files` are
    written into the run's folder first; the file `read_back` (at most MAX_FILE_BYTES) comes back in
    `SandboxResult.file` (None when the program did not write it).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb must be at least 32 (the interpreter itself needs it), got {memory_mb}")

    with tempfile.TemporaryDirectory(prefix="raygrpo-sandbox-", ignore_cleanup_errors=True) as workdir:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        for name, text in (files or {}).items():
            if os.path.basename(name) != name or name in ("main.py", ""):
                raise ValueError(f"files: {name!r} must be a plain file name other than main.py")
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(text)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        }
        proc = subprocess.Popen(
            [*_fs_prefix(), workdir, sys.executable, "-I", "-c", _PRELUDE] if _fs_prefix()
            else [*_netns_prefix(), sys.executable, "-I", "-c", _PRELUDE],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # pgid == pid: one killpg reaches everything it forked
            preexec_fn=_limits(timeout_s, memory_mb),
        )
        out: list[bytes] = []
        err: list[bytes] = []
        readers = [
            threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True),
            threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True),
        ]
        for reader in readers:
            reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        # Also after a normal exit: background children the program left behind die with it.
        _kill_group(proc.pid)
        proc.wait()
        for reader, stream in zip(readers, (proc.stdout, proc.stderr), strict=True):
            # A child that escaped the group (setsid) may still hold the pipe: don't hang on it,
            # and leave that stream to its daemon reader rather than closing it under the read.
            reader.join(timeout=1.0)
            if stream is not None and not reader.is_alive():
                stream.close()
        file = None
        if read_back is not None:
            try:
                with open(os.path.join(workdir, read_back), "rb") as f:
                    file = f.read(MAX_FILE_BYTES).decode("utf-8", errors="replace")
            except OSError:
                pass

    returncode = None if timed_out else proc.returncode
    return SandboxResult(
        ok=returncode == 0,
        returncode=returncode,
        stdout=b"".join(out).decode("utf-8", errors="replace"),
        stderr=b"".join(err).decode("utf-8", errors="replace"),
        timed_out=timed_out,
        file=file,
    )
