"""The processes of a Ray cluster a test started, found by a marker in their environment and stopped.

A test sets `MARKER_ENV` to a value of its own before its cluster starts; every process of the cluster
inherits it, the nodes an autoscaler adds and the agents that rename themselves (`ray::DashboardAgent`)
included. Those of a node removed mid-test are orphans by the end, and one left behind spins on its lost
raylet and takes a core for the rest of the session. (tests/ is on sys.path: its conftest puts it there.)
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
    """SIGKILL every process carrying `marker`, and those `also` picks with all their children; wait for them.
    Returns the names of the processes killed; fails if a marked one is still there after."""
    doomed: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if _marked(proc, marker):
                doomed[proc.pid] = proc
            elif also(proc):
                doomed[proc.pid] = proc
                doomed.update((child.pid, child) for child in proc.children(recursive=True))
    for proc in doomed.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(list(doomed.values()), timeout=30)
    left = []
    for proc in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if _marked(proc, marker):
                left.append(f"{proc.pid} {proc.info['name']}")
    assert not left, f"processes of the test's cluster outlived it and a SIGKILL: {left}"
    return [p.info.get("name") or str(p.pid) for p in doomed.values()]
