"""Run untrusted Python (model completions plus test asserts) in a throwaway, limited subprocess.

Layers, outermost first:
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
What it does not do: filesystem isolation. There is no chroot or mount namespace, so the program can
read and (as far as the user running it may) write files outside its working directory, including
Unix sockets on disk, which a network namespace does not cover. A child that calls setsid() escapes
the process-group kill. Run reward workers as an unprivileged user, or in a container, when
completions may be adversarial.
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


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256) -> SandboxResult:
    """Run `code` as a Python program under the layers in the module docstring.

    `ok` is True only for exit status 0 within `timeout_s` seconds of wall-clock time. Running out
    of memory shows as a MemoryError (exit 1) or a kill by signal (negative returncode).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb must be at least 32 (the interpreter itself needs it), got {memory_mb}")

    with tempfile.TemporaryDirectory(prefix="raygrpo-sandbox-", ignore_cleanup_errors=True) as workdir:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        }
        proc = subprocess.Popen(
            [*_netns_prefix(), sys.executable, "-I", "-c", _PRELUDE],
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

    returncode = None if timed_out else proc.returncode
    return SandboxResult(
        ok=returncode == 0,
        returncode=returncode,
        stdout=b"".join(out).decode("utf-8", errors="replace"),
        stderr=b"".join(err).decode("utf-8", errors="replace"),
        timed_out=timed_out,
    )
