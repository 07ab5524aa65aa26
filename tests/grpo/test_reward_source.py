"""A reward given as source runs only in the sandbox (grpo.rewards.SandboxedReward): a reward that opens
a socket, writes outside its folder or loops forever scores 0 and is counted, and the batch goes on."""

from __future__ import annotations

import sys
import uuid

import pytest

from grpo import sandbox
from grpo.rewards import RewardError, RewardWorker, SandboxedReward, compile_untrusted

pytestmark = pytest.mark.usefixtures("sandbox")

GOOD = """
def reward(prompt, completion, expected):
    return 1.0 if completion.strip() == expected.strip() else 0.0
"""

HOSTILE = """
import os, socket, time

def reward(prompt, completion, expected):
    if completion == "socket":
        import _socket
        s = _socket.socket()
        s.settimeout(2)
        s.connect(("1.1.1.1", 53))
        return 1.0
    if completion == "write":
        with open(expected, "w") as f:  # a path outside the run's folder
            f.write("escaped")
        return 1.0
    if completion == "loop":
        while True:
            pass
    if completion == "stubborn":  # swallows the per-item alarm: only the kill stops it
        while True:
            try:
                time.sleep(1)
            except BaseException:
                pass
    if completion == "local":
        open("scratch.txt", "w").write("fine")  # its own folder is writable
        return 0.5
    return 1.0 if completion == expected else 0.0
"""


def test_a_good_source_scores_a_batch_in_one_sandbox_run():
    r = SandboxedReward(GOOD, timeout_s=5)
    res = r.score_batch([("p", " 3", "3"), ("p", "4", "3"), ("p", "7", "7")])
    assert res.rewards == [1.0, 0.0, 1.0] and res.errors == res.timeouts == 0
    assert r("p", "1", "1") == 1.0


def test_hostile_items_score_zero_are_counted_and_the_rest_still_score(tmp_path):
    outside = tmp_path / f"escape-{uuid.uuid4().hex}"
    r = SandboxedReward(HOSTILE, timeout_s=1.5)
    items = [("p", "socket", "x"), ("p", "write", str(outside)), ("p", "loop", "x"), ("p", "ok", "ok"),
             ("p", "local", "x")]
    res = r.score_batch(items)
    assert res.rewards == [0.0, 0.0, 0.0, 1.0, 0.5], res
    assert res.timeouts == 1 and res.errors == 2, res  # the loop; the socket and the write
    assert not outside.exists()
    assert any("Network is unreachable" in m or "Connection refused" in m for m in res.messages), res.messages
    assert any("No such file or directory" in m or "Read-only" in m or "Permission" in m
               for m in res.messages), res.messages


def test_an_item_that_swallows_its_alarm_is_killed_with_its_process():
    r = SandboxedReward(HOSTILE, timeout_s=0.5)
    res = r.score_batch([("p", "ok", "ok"), ("p", "stubborn", "x"), ("p", "ok", "ok")])
    # the first item was scored before the process hung; the stubborn one and the one after it time out
    assert res.rewards == [1.0, 0.0, 0.0] and res.timeouts == 2, res


@pytest.mark.parametrize(("source", "message"), [
    ("def reward(:\n", "SyntaxError"),
    ("x = 1\n", "defines no function reward"),
    ("def reward(p, c, e):\n    return 'high'\n", "not a number"),
    ("import os\nos._exit(0)\n", "the sandbox ended"),
])
def test_a_broken_source_is_refused_at_start_with_the_reason(source, message):
    with pytest.raises(RewardError, match=message):
        RewardWorker("exact_match", timeout_s=2, source=source)


def test_the_worker_never_imports_the_source():
    marker = f"raygrpo_probe_{uuid.uuid4().hex}"
    worker = RewardWorker("exact_match", timeout_s=5, source=GOOD + f"\nimport sys\nsys.modules[{marker!r}] = 1\n")
    assert worker.score([("p", "2", "2")]).rewards == [1.0]
    assert marker not in sys.modules


@pytest.mark.parametrize(("source", "message"), [
    ("def reward(:\n", "SyntaxError: invalid syntax \\(line 1\\)"),
    ("x = 1\0", "null bytes"),
    ("(" * 300 + ")" * 300, "SyntaxError|RecursionError"),
    ("   \n", "empty"),
    ("x = 1\n" * 20_000, "more than 65536"),
])
def test_the_api_only_compiles_the_source_and_refuses_what_does_not(source, message):
    with pytest.raises(RewardError, match=message):
        compile_untrusted(source)


def test_compiling_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    compile_untrusted(f"open({str(marker)!r}, 'w').write('x')\n")
    assert not marker.exists()


def test_without_the_sandbox_a_source_is_refused_never_run_with_less(monkeypatch, tmp_path):
    marker = tmp_path / "ran"
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox.status.cache_clear()
    try:
        with pytest.raises(RewardError, match="refused: bubblewrap is not installed"):
            RewardWorker("exact_match", timeout_s=2, source=f"open({str(marker)!r}, 'w')\ndef reward(p, c, e):\n    return 1.0\n")
        assert not marker.exists()
    finally:
        monkeypatch.undo()
        sandbox.status.cache_clear()
