"""The processes of a Ray cluster a test started, found by a marker in their environment and stopped.

A test sets `MARKER_ENV` to a value of its own before its cluster starts; the processes of the cluster
inherit it, the nodes an autoscaler adds included, though a raylet may start its agents (which rename
themselves `ray::DashboardAgent`) without it: they are taken as their raylet's children. Those of a node
removed mid-test are orphans by the end, and one left behind spins on its lost raylet and takes a core for
the rest of the session. (tests/ is on sys.path: its conftest puts it there.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import psutil

MARKER_ENV = "RAYGRPO_TEST_CLUSTER"


def _marked(proc: psutil.Process, marker: str) -> bool:
    return proc.pid != os.getpid() and proc.environ().get(MARKER_ENV) == marker


def reap(marker: str, *, also: Callable[[psutil.Process], bool] = lambda proc: False) -> list[str]:
    """SIGKILL every process carrying `marker` and those `also` picks, with all their children; wait for them.
    Returns the names of the processes killed; fails if a marked one is still there after."""
    doomed: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if _marked(proc, marker) or also(proc):
                doomed[proc.pid] = proc
                # with its children: a raylet starts its agents with an environment of their own
                doomed.update((child.pid, child) for child in proc.children(recursive=True))
    names = []
    for proc in doomed.values():
        with contextlib.suppress(psutil.Error):
            names.append(proc.name())
            proc.kill()
    psutil.wait_procs(list(doomed.values()), timeout=30)
    left = []
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if _marked(proc, marker):
                left.append(f"{proc.pid} {proc.info['name']}")
    assert not left, f"processes of the test's cluster outlived it and a SIGKILL: {left}"
    return names
