"""The code sandbox: exit status, timeouts, memory and output limits, no network, no leftovers."""

from __future__ import annotations

import os
import time

import pytest

from grpo.sandbox import NETWORK_BLOCKED_MESSAGE, OUTPUT_CAP_BYTES, netns_available, run_python


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


def test_infinite_loop_is_timed_out():
    result = run_python("while True:\n    pass", timeout_s=0.5)
    assert result.timed_out and not result.ok and result.returncode is None


def test_forked_children_are_killed_with_the_program(tmp_path):
    marker = tmp_path / "child-survived"
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    time.sleep(0.4)\n"
        f"    open({str(marker)!r}, 'w').write('x')\n"
        "else:\n"
        "    print('parent done')\n"
    )
    result = run_python(code)
    assert result.ok and result.stdout == "parent done\n"
    time.sleep(0.7)  # the child would have written by now had it survived
    assert not marker.exists()


def test_memory_blow_up_is_stopped():
    result = run_python("x = bytearray(1024 * 1024 * 1024)\nprint('allocated')", memory_mb=128)
    assert not result.ok and not result.timed_out
    assert "allocated" not in result.stdout
    assert "MemoryError" in result.stderr or (result.returncode or 0) < 0


def test_output_is_capped():
    result = run_python("import sys\nsys.stdout.write('x' * 1_000_000)")
    assert result.ok
    assert result.stdout.startswith("x" * OUTPUT_CAP_BYTES)
    assert len(result.stdout) < OUTPUT_CAP_BYTES + 100 and "truncated" in result.stdout


def test_socket_connect_is_blocked_by_the_prelude():
    code = "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))"
    result = run_python(code)
    assert not result.ok
    assert f"PermissionError: {NETWORK_BLOCKED_MESSAGE}" in result.stderr
    result = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert f"PermissionError: {NETWORK_BLOCKED_MESSAGE}" in result.stderr


@pytest.mark.skipif(not netns_available(), reason="no network namespace (unshare) on this machine")
def test_network_namespace_blocks_raw_sockets_too():
    # `_socket` goes around the prelude; only the empty network namespace stops it.
    code = "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', 9))"
    result = run_python(code)
    assert not result.ok
    assert "OSError: [Errno 101] Network is unreachable" in result.stderr


def test_runs_in_a_temporary_directory_that_is_removed():
    result = run_python("import os\nopen('leftover.txt', 'w').write('data')\nprint(os.getcwd())")
    assert result.ok
    workdir = result.stdout.strip()
    assert os.path.basename(workdir).startswith("raygrpo-sandbox-")
    assert not os.path.exists(workdir)
    assert not os.path.exists(os.path.join(workdir, "leftover.txt"))


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("RAYGRPO_TEST_SECRET", "s3cret")
    result = run_python("import os\nprint(sorted(os.environ))")
    assert result.ok and "RAYGRPO_TEST_SECRET" not in result.stdout


def test_stdin_is_closed():
    result = run_python("import sys\nprint(repr(sys.stdin.read()))", timeout_s=2)
    assert result.ok and result.stdout == "''\n"


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_python("pass", memory_mb=1)
