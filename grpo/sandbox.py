"""Run untrusted Python (reward source, model completions with their tests, the `python` tool) in a
bubblewrap sandbox, and nowhere else.

Every run is one `bwrap` process tree with:
  - all namespaces unshared: user, pid, mount, network, ipc, uts (and cgroup where the kernel has it).
    The program sees no other process (pid 1 is bwrap's own reaper, started with an empty
    environment), no network interface but a downed loopback, a hostname of its own;
  - a throwaway identity: inside, uid/gid 65534 and no capabilities (no_new_privs set, nested user
    namespaces off). Run as root, the caller maps 65534 to a random unused host uid from
    RAYGRPO_SANDBOX_UID_RANGE (61184-65519 by default), so the process owns nothing on the host and its
    process count is its own; run as another user, bwrap maps it to that user (the kernel counts the
    sandbox's processes per user namespace either way);
  - a filesystem of its own: an empty tmpfs root made read-only, with only the Python runtime bound
    read-only (the interpreter's prefix and the system's shared-library folders), `/proc` of its own
    pid namespace, a minimal `/dev`, and two small tmpfs folders: `/tmp` and the work folder `/work`
    (the program's files are copied in; nothing on the host is writable, nor readable beyond that);
  - rlimits set before the program's first line: CPU seconds, address space, file size, open files,
    processes (RLIMIT_NPROC), no core dumps;
  - a wall-clock bound: the whole tree is SIGKILLed at the timeout (and by `timeout(1)` shortly after,
    should the caller itself die first); `--die-with-parent` takes the sandbox with bwrap. A program that
    writes more than FLOOD_BYTES of output is killed too (64 KiB of each stream is kept).
Where any of this cannot be set up (no `bwrap`, user namespaces disabled, a seccomp profile that forbids
them), `status()` says why and `run_python` raises SandboxUnavailable: user code is refused, never run
with less isolation.

Not covered: kernel bugs (run the reward workers under gVisor for that: kuberay/), CPU time stolen from
neighbours within the limits, and timing side channels.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

OUTPUT_CAP_BYTES = 64 * 1024
"""stdout and stderr are each cut to this many bytes; the rest is read and discarded"""

MAX_FILE_BYTES = 16 * 1024 * 1024
"""largest file the program may write (RLIMIT_FSIZE), and the most read back from its results channel"""

FLOOD_BYTES = 16 * 1024 * 1024
"""a program that writes more than this to stdout or stderr is killed (what it wrote first is kept)"""

MAX_OPEN_FILES = 64
"""RLIMIT_NOFILE for the program"""

MAX_PROCESSES = 32
"""RLIMIT_NPROC: processes (and threads) the program may have at once, itself included"""

TMPFS_BYTES = 64 * 1024 * 1024
"""size of each of the sandbox's writable folders (/work and /tmp): tmpfs is memory RLIMIT_AS does not count"""

SANDBOX_UID = 65534
"""the program's uid and gid inside the sandbox (`nobody`)"""

WORKDIR = "/work"
RESULTS_FD = 3
"""the program's results channel: what it writes to this fd comes back as SandboxResult.results"""

DEFAULT_UID_RANGE = (61184, 65519)
"""host uids a root caller picks the sandbox's from (systemd's range for dynamic users; it fits a pod whose
user namespace maps 65536 uids)"""


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot start on this machine; the message says why and what to install or allow."""


@dataclass
class SandboxResult:
    """What one sandboxed run did. `returncode` is None when the run was killed for timing out."""

    ok: bool
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    results: str | None = None
    """what the program wrote to fd RESULTS_FD (at most MAX_FILE_BYTES), when asked for"""


@dataclass(frozen=True)
class Status:
    available: bool
    reason: str
    """why not, naming the fix; or how it runs (root-mapped or unprivileged) when available"""


# Runs first in the sandboxed interpreter (python -I -S -c LAUNCHER cpu_s memory_bytes nproc results_fd).
# As root's sandbox it starts as the user namespace's uid 0 (mapped to host root only while bwrap set the
# mounts up), with just CAP_SETUID/SETGID/SYS_RESOURCE in that namespace: it turns nested user namespaces
# off and becomes 65534, which drops every capability. Then the limits, then the program.
_LAUNCHER = f"""
import os, resource, sys
def _fail(message):
    os.write(2, ("sandbox: " + message + "\\n").encode())
    os._exit(70)
try:
    if os.getuid() == 0:
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        os.setgroups([])
        os.setresgid({SANDBOX_UID}, {SANDBOX_UID}, {SANDBOX_UID})
        os.setresuid({SANDBOX_UID}, {SANDBOX_UID}, {SANDBOX_UID})
    if os.getuid() != {SANDBOX_UID} or os.geteuid() != {SANDBOX_UID}:
        _fail("unexpected uid %d" % os.getuid())
    cpu_s, memory, nproc, results = (int(a) for a in sys.argv[1:5])
    for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory),
                         (resource.RLIMIT_FSIZE, {MAX_FILE_BYTES}), (resource.RLIMIT_NOFILE, {MAX_OPEN_FILES}),
                         (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    if results >= 0 and results != {RESULTS_FD}:
        os.dup2(results, {RESULTS_FD})
    os.closerange({RESULTS_FD} + (results >= 0), 65536)
except Exception as e:
    _fail("%s: %s" % (type(e).__name__, e))
del os, resource, _fail
import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass(frozen=True)
class _Runtime:
    executable: str
    prefix: str
    binds: tuple[tuple[str, str], ...]
    """(kind, path): ("dir", p) bound read-only at p, ("link", p) recreated as the same symlink"""


@functools.cache
def _runtime() -> _Runtime:
    """The interpreter the sandbox runs (this one's base interpreter, or RAYGRPO_SANDBOX_PYTHON) and what
    it needs from the host: its prefix and the shared-library folders."""
    chosen = os.environ.get("RAYGRPO_SANDBOX_PYTHON")
    if chosen:
        executable = os.path.realpath(chosen)
        probe = subprocess.run([executable, "-I", "-S", "-c", "import sys; print(sys.base_prefix)"],
                               capture_output=True, text=True, timeout=30, check=False)
        prefix = os.path.realpath(probe.stdout.strip() or os.path.dirname(os.path.dirname(executable)))
    else:
        executable = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        prefix = os.path.realpath(sys.base_prefix)
    binds: list[tuple[str, str]] = [("dir", prefix)]
    if not executable.startswith(prefix + os.sep):
        binds.append(("dir", executable))
    for lib in ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib"):
        if lib == prefix or lib.startswith(prefix + os.sep):
            continue
        if os.path.islink(lib):
            binds.append(("link", lib))
        elif os.path.isdir(lib):
            binds.append(("dir", lib))
    return _Runtime(executable=executable, prefix=prefix, binds=tuple(binds))


def _uid_range() -> tuple[int, int]:
    raw = os.environ.get("RAYGRPO_SANDBOX_UID_RANGE", "")
    try:
        lo, hi = (int(x) for x in raw.split("-", 1)) if raw else DEFAULT_UID_RANGE
    except ValueError:
        raise SandboxUnavailable(f"RAYGRPO_SANDBOX_UID_RANGE={raw!r} is not LOW-HIGH") from None
    if not 0 < lo <= hi < 2**32 - 1:
        raise SandboxUnavailable(f"RAYGRPO_SANDBOX_UID_RANGE={raw!r}: need 0 < LOW <= HIGH")
    return lo, hi


def _ancestors(path: str) -> list[str]:
    """`path` and every folder above it, e.g. /a/b/c -> [/a/b/c, /a/b, /a]."""
    out = []
    while path not in ("/", ""):
        out.append(path)
        path = os.path.dirname(path)
    return out


def _bwrap_command(bwrap: str, files: list[tuple[int, str]], *, as_root: bool, info_fd: int, block_fd: int
                   ) -> list[str]:
    rt = _runtime()
    cmd = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
           "--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", WORKDIR,
           "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8"]
    if as_root:  # we write the uid map ourselves (65534 -> a throwaway host uid) while bwrap waits
        cmd += ["--userns-block-fd", str(block_fd), "--info-fd", str(info_fd), "--cap-drop", "ALL",
                "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SYS_RESOURCE"]
    else:
        cmd += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--disable-userns"]
    # The folders above each bind are made 0755 here: bwrap would copy their host modes (a pyenv under a
    # 0700 /root would then be unreachable for uid 65534); they hold nothing but the way down.
    parents = sorted({os.path.dirname(p) for _, p in rt.binds for p in _ancestors(p)} - {"/"}, key=len)
    for parent in parents:
        cmd += ["--perms", "0755", "--dir", parent]
    for kind, path in rt.binds:
        cmd += ["--symlink", os.readlink(path), path] if kind == "link" else ["--ro-bind", path, path]
    cmd += ["--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp",
            "--perms", "1777", "--size", str(TMPFS_BYTES), "--tmpfs", WORKDIR]
    for fd, name in files:
        cmd += ["--perms", "0644", "--file", str(fd), f"{WORKDIR}/{name}"]
    cmd += ["--chdir", WORKDIR, "--remount-ro", "/"]
    return cmd


def _drain(stream: IO[bytes], sink: list[bytes], cap: int, on_flood: Callable[[], None] | None = None) -> None:
    """Read a pipe to EOF, keeping the first `cap` bytes (so a chatty program cannot block); past
    FLOOD_BYTES, `on_flood` (the kill) is called once: output beyond that is an attack on the reader."""
    kept = 0
    flooded = False
    while chunk := stream.read1(65536):
        if kept < cap:
            sink.append(chunk[: cap - kept])
        kept += len(chunk)
        if kept > FLOOD_BYTES and on_flood is not None and not flooded:
            flooded = True
            on_flood()
    if kept > cap:
        sink.append(f"\n[... {kept - cap} bytes truncated{'; killed for flooding' if flooded else ''}]".encode())


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already gone


def _map_ids(info_fd: int, block_fd: int, deadline_s: float) -> None:
    """Root's sandbox: read bwrap's child pid from its info fd, map the namespace's 0 to root (bwrap needs it
    to set the mounts up; the launcher leaves it before the program runs) and 65534 to a throwaway host uid,
    then let bwrap go on. Raises OSError/ValueError when bwrap ended or did not answer in time."""
    data = b""
    while not data.rstrip().endswith(b"}"):
        ready, _, _ = select.select([info_fd], [], [], deadline_s)
        if not ready:
            raise TimeoutError("bwrap did not report its child")
        chunk = os.read(info_fd, 4096)
        if not chunk:
            raise EOFError("bwrap exited before it set the sandbox up")
        data += chunk
    pid = int(json.loads(data)["child-pid"])
    lo, hi = _uid_range()
    host_id = random.SystemRandom().randint(lo, hi)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 0 1\n{SANDBOX_UID} {host_id} 1\n")
    os.write(block_fd, b"1")


def _launch(code: str, *, timeout_s: float, memory_mb: int, files: dict[str, str], results: bool
            ) -> SandboxResult:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("bubblewrap is not installed (the `bwrap` command; Debian/Ubuntu: "
                                 "apt-get install bubblewrap)")
    as_root = os.geteuid() == 0
    cpu_s = math.ceil(timeout_s) + 1  # the wall clock is the real bound; this catches busy loops early
    opened: list[int] = []
    try:
        with tempfile.TemporaryDirectory(prefix="raygrpo-sandbox-in-") as staging:
            file_fds: list[tuple[int, str]] = []
            for name, text in {"main.py": code, **files}.items():
                path = os.path.join(staging, name)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
                fd = os.open(path, os.O_RDONLY)
                opened.append(fd)
                file_fds.append((fd, name))
            info_r, info_w = os.pipe() if as_root else (-1, -1)
            block_r, block_w = os.pipe() if as_root else (-1, -1)
            res_r, res_w = os.pipe() if results else (-1, -1)
            opened += [fd for fd in (info_r, info_w, block_r, block_w, res_r, res_w) if fd >= 0]
            cmd = _bwrap_command(bwrap, file_fds, as_root=as_root, info_fd=info_w, block_fd=block_r)
            cmd += [_runtime().executable, "-I", "-S", "-c", _LAUNCHER, str(cpu_s), str(memory_mb * 1024 * 1024),
                    str(MAX_PROCESSES), str(res_w)]
            killer = shutil.which("timeout")
            if killer:  # outlives us: the tree dies a little after its bound even if this process is gone
                cmd = [killer, "-s", "KILL", str(math.ceil(timeout_s) + 10), *cmd]
            pass_fds = tuple(fd for fd, _ in file_fds) + tuple(fd for fd in (info_w, block_r, res_w) if fd >= 0)
            proc = subprocess.Popen(cmd, cwd="/", env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=pass_fds, start_new_session=True)
            for fd in (info_w, block_r, res_w, *(fd for fd, _ in file_fds)):
                if fd >= 0:
                    os.close(fd)
                    opened.remove(fd)
            out: list[bytes] = []
            err: list[bytes] = []
            res: list[bytes] = []
            flood = functools.partial(_kill_group, proc.pid)
            readers = [threading.Thread(target=_drain, args=(proc.stdout, out, OUTPUT_CAP_BYTES, flood), daemon=True),
                       threading.Thread(target=_drain, args=(proc.stderr, err, OUTPUT_CAP_BYTES, flood), daemon=True)]
            res_stream = os.fdopen(res_r, "rb") if res_r >= 0 else None
            if res_stream is not None:
                opened.remove(res_r)
                readers.append(threading.Thread(target=_drain, args=(res_stream, res, MAX_FILE_BYTES), daemon=True))
            for reader in readers:
                reader.start()
            if as_root:
                try:
                    _map_ids(info_r, block_w, deadline_s=30.0)
                except (OSError, ValueError, EOFError, TimeoutError, SandboxUnavailable):
                    pass  # bwrap fails on its own without a map (and says why on stderr)
                finally:  # unblocks bwrap either way: mapped, it goes on; not mapped, it fails
                    os.close(block_w)
                    opened.remove(block_w)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s + (1.0 if as_root else 0.5))  # + the sandbox's own start-up
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # after a normal exit too: nothing of the run outlives it
            proc.wait()
            for reader in readers:
                reader.join(timeout=5.0)
            for stream in (proc.stdout, proc.stderr, res_stream):
                if stream is not None:
                    stream.close()
    finally:
        for fd in opened:
            try:
                os.close(fd)
            except OSError:
                pass
    returncode = None if timed_out else proc.returncode
    return SandboxResult(ok=returncode == 0, returncode=returncode,
                         stdout=b"".join(out).decode("utf-8", errors="replace"),
                         stderr=b"".join(err).decode("utf-8", errors="replace"), timed_out=timed_out,
                         results=b"".join(res).decode("utf-8", errors="replace") if results else None)


# The probe: what a run must not be able to do here, checked once per process before any user code runs.
_PROBE = r"""
import os, sys
problems = []
if os.getuid() != 65534: problems.append("uid %d" % os.getuid())
if os.path.exists(open("canary").read()): problems.append("host files visible")
try:
    open("/probe-outside", "w"); problems.append("root filesystem writable")
except OSError: pass
open("inside", "w").write("x")
import socket
if [name for _, name in socket.if_nameindex()] != ["lo"]: problems.append("network interfaces visible")
print("ok" if not problems else "; ".join(problems))
"""


@functools.cache
def status() -> Status:
    """Whether user code can run here, checked once per process by running a probe in the sandbox."""
    canary = os.path.dirname(os.path.abspath(__file__))
    try:
        run = _launch(_PROBE, timeout_s=20.0, memory_mb=256, files={"canary": canary}, results=False)
    except SandboxUnavailable as e:
        return Status(False, str(e))
    except OSError as e:
        return Status(False, f"the sandbox could not be started: {e}")
    if run.ok and run.stdout.strip() == "ok":
        return Status(True, "root-mapped" if os.geteuid() == 0 else "unprivileged")
    said = (run.stderr.strip() or run.stdout.strip() or f"exit {run.returncode}").splitlines()
    reason = said[-1][:300] if said else "no output"
    if "bwrap:" in run.stderr:
        reason = next(line for line in run.stderr.splitlines() if "bwrap:" in line)[:300]
        if "namespace" in reason or "Operation not permitted" in reason:
            reason += (" (this machine or container does not allow unprivileged user namespaces: enable "
                       "kernel.unprivileged_userns_clone / user.max_user_namespaces, or allow them in the "
                       "container's seccomp profile)")
    return Status(False, f"the code sandbox (bubblewrap) does not work here: {reason}")


def require() -> None:
    """Raise SandboxUnavailable, saying why, unless the sandbox works on this machine."""
    s = status()
    if not s.available:
        raise SandboxUnavailable(s.reason)


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256, files: dict[str, str] | None = None,
               results: bool = False) -> SandboxResult:
    """Run `code` as a Python program (standard library only) in the sandbox described above.

    `ok` is True only for exit status 0 within `timeout_s` seconds of wall-clock time. Running out of
    memory shows as a MemoryError (exit 1) or a kill by signal (negative returncode). `files` are copied
    into the work folder first (plain names); with `results`, whatever the program writes to fd 3
    comes back in `SandboxResult.results`. Raises SandboxUnavailable when the sandbox cannot start here.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb must be at least 32 (the interpreter itself needs it), got {memory_mb}")
    for name in files or {}:
        if os.path.basename(name) != name or name in ("main.py", "", ".", ".."):
            raise ValueError(f"files: {name!r} must be a plain file name other than main.py")
    require()
    return _launch(code, timeout_s=timeout_s, memory_mb=memory_mb, files=dict(files or {}), results=results)
