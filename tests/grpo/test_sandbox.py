"""The code sandbox (bubblewrap): what an untrusted program can and cannot do, tried the way an attacker would.

Never probed here: `kill(-1, ...)` and unbounded fork bombs. Were isolation missing, they would take down
every process of the machine's user, the test runner with them; the bounded forms below show the limits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from grpo import sandbox
from grpo.sandbox import MAX_PROCESSES, OUTPUT_CAP_BYTES, SandboxUnavailable, run_python

pytestmark = pytest.mark.usefixtures("sandbox")


def test_passing_program():
    result = run_python("import sys\nprint('hello')\nprint('warn', file=sys.stderr)")
    assert result.ok and result.returncode == 0 and not result.timed_out
    assert result.stdout == "hello\n" and result.stderr == "warn\n"


def test_failing_assert():
    result = run_python("assert 1 + 1 == 3, 'math is broken'")
    assert not result.ok and result.returncode == 1 and not result.timed_out
    assert "AssertionError: math is broken" in result.stderr


def test_future_imports_and_main_guard_still_work():
    result = run_python("from __future__ import annotations\nif __name__ == '__main__':\n    print('main')")
    assert result.ok and result.stdout == "main\n"


def test_files_go_in_and_results_come_back_on_their_own_channel():
    result = run_python("import os\nos.write(3, open('data.txt').read().upper().encode())\nprint('noise')",
                        files={"data.txt": "payload"}, results=True)
    assert result.ok and result.results == "PAYLOAD" and result.stdout == "noise\n"


def test_infinite_loop_is_timed_out():
    result = run_python("while True:\n    pass", timeout_s=0.5)
    assert result.timed_out and not result.ok and result.returncode is None


def test_it_runs_as_a_throwaway_uid_without_capabilities():
    code = ("import json, os\n"
            "caps = {l.split()[0]: l.split()[1] for l in open('/proc/self/status') if l.startswith('Cap')}\n"
            "maps = [l.split() for l in open('/proc/self/uid_map')]\n"
            "print(json.dumps([os.getuid(), os.getgid(), os.getgroups(), caps, maps]))\n")
    result = run_python(code)
    assert result.ok, result.stderr
    uid, gid, groups, caps, maps = json.loads(result.stdout)
    assert (uid, gid, groups) == (65534, 65534, [])
    assert int(caps["CapEff:"], 16) == int(caps["CapPrm:"], 16) == int(caps["CapAmb:"], 16) == 0
    if os.geteuid() == 0:  # root's sandboxes map 65534 to an unused host uid, never to root
        lo, hi = sandbox.DEFAULT_UID_RANGE
        host = {int(inside): int(outside) for inside, outside, _ in maps}
        assert lo <= host[65534] <= hi


def test_host_files_are_not_there(tmp_path):
    secret = tmp_path / "jwt_secret"
    secret.write_text("S=" + uuid.uuid4().hex)
    targets = [str(secret), "/etc/passwd", os.path.expanduser("~"), os.getcwd(), sandbox.__file__,
               f"/proc/{os.getppid()}/environ"]
    code = ("import json, os\nout = {}\n"
            f"for p in {targets!r}:\n"
            "    try:\n        open(p).read(); out[p] = 'read'\n"
            "    except OSError as e:\n        out[p] = type(e).__name__\n"
            "print(json.dumps(out))\n")
    result = run_python(code)
    assert result.ok, result.stderr
    assert "read" not in result.stdout and secret.read_text() not in result.stdout


def test_no_other_process_is_visible_and_a_canary_cannot_be_signalled():
    canary = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        code = (f"import os\npids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
                f"try:\n    os.kill({canary.pid}, 0)\n    print('reached', pids)\n"
                "except ProcessLookupError:\n    print('gone', pids)\n"
                "except PermissionError:\n    print('denied', pids)\n"
                "print(repr(open('/proc/1/environ').read()) if os.access('/proc/1/environ', os.R_OK) else 'unreadable')\n")
        result = run_python(code)
        assert result.ok, result.stderr
        first, environ = result.stdout.splitlines()
        assert first.startswith(("gone", "denied")), first  # a pid it cannot name, or pid 1 (bwrap)
        assert max(eval(first.split(" ", 1)[1])) < 10  # only its own namespace's handful of pids
        assert environ in ("''", "unreadable")  # pid 1 is bwrap, started with an empty environment
        assert canary.poll() is None
    finally:
        canary.kill()
        canary.wait()


def test_the_filesystem_is_read_only_but_the_work_folder_and_cannot_be_remounted():
    code = ("import os, subprocess\n"
            "open('mine.txt', 'w').write('x')\n"
            "for p in ['/escape', '/usr/lib/escape', '/proc/escape']:\n"
            "    try:\n        open(p, 'w'); print('wrote', p)\n"
            "    except OSError as e:\n        print('refused', p, e.errno)\n")
    result = run_python(code)
    assert result.ok, result.stderr
    assert "wrote" not in result.stdout and result.stdout.count("refused") == 3
    # no mount(8) inside (only the Python runtime is bound), and the syscall needs a capability it lacks
    remount = run_python("import os\nprint(any(os.path.exists(p) for p in ('/bin/mount', '/usr/bin/mount')))\n"
                         "try:\n    import ctypes\n"
                         "except ImportError:\n    print('no ctypes')\n"
                         "else:\n    libc = ctypes.CDLL(None, use_errno=True)\n"
                         "    rc = libc.mount(None, b'/usr/lib', None, 0x20 | 0x1000, None)  # MS_REMOUNT|MS_BIND\n"
                         "    print('mount', rc, ctypes.get_errno())\n"
                         "    open('/usr/lib/escape', 'w')\n")
    assert remount.stdout.startswith("False\n"), remount
    assert remount.stdout.endswith(("no ctypes\n", "mount -1 1\n")), remount  # EPERM


def test_the_process_limit_stops_a_bounded_fork_storm():
    code = ("import os, time\nn = 0\n"
            "try:\n    for _ in range(500):\n"
            "        if os.fork() == 0:\n            time.sleep(5)\n            os._exit(0)\n"
            "        n += 1\n"
            "except OSError as e:\n    print('stopped', n, e.errno)\n")
    result = run_python(code, timeout_s=10)
    assert result.stdout.startswith("stopped"), result
    started = int(result.stdout.split()[1])
    assert started < MAX_PROCESSES and result.stdout.split()[2] == "11"  # EAGAIN


def test_a_setsid_child_does_not_outlive_the_run():
    marker = f"raygrpo-escapee-{uuid.uuid4().hex}"
    code = ("import os, sys\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
            "print('parent exits')\n")
    result = run_python(code, timeout_s=5)
    assert result.ok
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline_has(p, marker)]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive


def _cmdline_has(pid: str, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


def test_no_network_even_with_raw_sockets():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        code = ("import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(2)\n"
                f"try:\n    s.connect(('127.0.0.1', {port}))\n    print('connected')\n"
                "except OSError as e:\n    print('refused', e.errno)\n"
                "import socket\nprint([n for _, n in socket.if_nameindex()])\n")
        result = run_python(code)
        assert result.ok, result.stderr
        assert "connected" not in result.stdout and "['lo']" in result.stdout  # its own loopback, nothing else
    finally:
        listener.close()


def test_memory_blow_up_is_stopped():
    result = run_python("x = bytearray(4 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert not result.ok and not result.timed_out
    assert "allocated" not in result.stdout
    assert "MemoryError" in result.stderr or (result.returncode or 0) < 0


def test_output_is_capped_and_a_gigabyte_of_it_is_stopped():
    result = run_python("import sys\nsys.stdout.write('x' * 1_000_000)")
    assert result.ok
    assert result.stdout.startswith("x" * OUTPUT_CAP_BYTES)
    assert len(result.stdout) < OUTPUT_CAP_BYTES + 100 and "truncated" in result.stdout
    flood = run_python("import os\nchunk = b'y' * 2 ** 20\nfor _ in range(1024):\n    os.write(1, chunk)\n"
                       "os.write(3, b'printed it all')", timeout_s=30, results=True)
    assert len(flood.stdout) < OUTPUT_CAP_BYTES + 100 and "killed for flooding" in flood.stdout
    assert not flood.ok and flood.returncode == -9 and flood.results == ""  # killed long before the gigabyte


def test_environment_is_clean(monkeypatch):
    monkeypatch.setenv("RAYGRPO_TEST_SECRET", "s3cret")
    result = run_python("import os\nprint(sorted(os.environ))")
    assert result.ok and result.stdout.strip() == "['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR']"  # PWD: bwrap's --chdir


def test_only_the_standard_library_is_importable():
    result = run_python("import json, re, math\ntry:\n    import torch\nexcept ImportError:\n    print('no torch')")
    assert result.ok and result.stdout == "no torch\n"


def test_stdin_is_closed():
    result = run_python("import sys\nprint(repr(sys.stdin.read()))", timeout_s=2)
    assert result.ok and result.stdout == "''\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="the root-mapped mode is root's")
def test_nested_user_namespaces_are_off():
    result = run_python("print(open('/proc/sys/user/max_user_namespaces').read().strip())")
    assert result.ok and result.stdout == "0\n"


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
                    reason="runs the unprivileged mode as another user, which needs root and a system Python")
def test_the_unprivileged_mode_isolates_the_same_way(tmp_path):
    # What a service running as an ordinary user (the Ray image's uid 1000) gets: bwrap maps 65534 to it.
    root = os.path.dirname(os.path.dirname(sandbox.__file__))
    driver = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "from grpo.sandbox import status, run_python\n"
              "print(status())\n"
              "r = run_python('import os, socket, sys; print(os.getuid(), os.path.exists(open(\"p\").read()), "
              "[n for _, n in socket.if_nameindex()])', files={'p': sys.argv[2]})\n"
              "print(r.stdout.strip(), r.stderr.strip())\n")
    out = subprocess.run(["/usr/bin/python3", "-I", "-c", driver, root, str(tmp_path)], user=61999, group=61999,
                         extra_groups=[], env={"PATH": "/usr/bin:/bin", "RAYGRPO_SANDBOX_PYTHON": "/usr/bin/python3"},
                         capture_output=True, text=True, timeout=60, cwd="/")
    if "No module named" in out.stderr or "Permission denied" in out.stderr:
        pytest.skip(f"this checkout is not readable by another user: {out.stderr.strip()[-200:]}")
    lines = out.stdout.splitlines()
    assert lines[0] == "Status(available=True, reason='unprivileged')", out
    assert lines[1].strip() == "65534 False ['lo']", out


def test_without_bwrap_user_code_is_refused_naming_why(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox.status.cache_clear()
    try:
        assert not sandbox.status().available
        with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
            run_python("print('never runs')")
    finally:
        monkeypatch.undo()
        sandbox.status.cache_clear()


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_python("pass", memory_mb=1)
    with pytest.raises(ValueError, match="plain file name"):
        run_python("pass", files={"../x": ""})
