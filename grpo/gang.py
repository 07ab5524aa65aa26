"""Gang reservation: a run takes everything it needs, or waits holding nothing.

A run needs two groups of resources: its actors (rollout and reward) and Ray Train's worker group. Train
V2 creates the worker group's placement group itself and takes none from outside, so the two cannot be one
placement group. What makes them one reservation is the cluster's `ReservationLedger` (one named, detached
actor): before a run asks for anything it books its whole demand, and the ledger grants a booking only when
what is free, less what earlier bookings have not placed yet, holds all of it, or when no other run is
starting (then that run alone may wait on its placement groups; nobody else can take what it waits for).
A run releases its booking once its actors are up and its worker group trains (then what it holds shows
in Ray's own free count), or when it ends; a booking its driver stops renewing lapses after `lease_s`.

So two runs can never each hold half of what they need: at any time at most one run is partly placed, and
it waits only for runs that hold everything they need and will end. Runs started through the job API
are admitted by the dispatcher first; this covers `ray job submit` runs and several drivers at once.
"""

from __future__ import annotations

import time
from typing import Any

LEDGER_NAME = "raygrpo-reservations"
NAMESPACE = "raygrpo"


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(res.items()) if v) or "nothing"


class ReservationLedger:
    """Bookings of runs that are starting: run id -> (demand, lease expiry)."""

    def __init__(self) -> None:
        self.booked: dict[str, tuple[dict[str, float], float]] = {}

    def _free(self) -> dict[str, float]:
        import ray

        return {k: float(v) for k, v in ray.available_resources().items()}

    def book(self, run: str, demand: dict[str, float], lease_s: float,
             free: dict[str, float] | None = None) -> tuple[bool, str]:
        """(granted, reason). Renews the lease of a booking the run already holds."""
        now = time.monotonic()
        self.booked = {r: b for r, b in self.booked.items() if b[1] > now}
        if run in self.booked:
            self.booked[run] = (self.booked[run][0], now + lease_s)
            return True, "booked"
        free = self._free() if free is None else free
        others: dict[str, float] = {}
        for need, _ in self.booked.values():
            for k, v in need.items():
                others[k] = others.get(k, 0.0) + v
        if not self.booked:
            self.booked[run] = (dict(demand), now + lease_s)
            fits = all(free.get(k, 0.0) + 1e-9 >= v for k, v in demand.items())
            return True, "booked: fits what is free" if fits else "booked: no other run is starting"
        if all(free.get(k, 0.0) - others.get(k, 0.0) + 1e-9 >= v for k, v in demand.items()):
            self.booked[run] = (dict(demand), now + lease_s)
            return True, "booked: fits what is free next to the runs starting"
        return False, (f"waiting for resources: needs {_fmt(demand)}; free {_fmt({k: free.get(k, 0.0) for k in demand})}, "
                       f"of which {_fmt({k: others.get(k, 0.0) for k in demand})} is booked by "
                       f"{len(self.booked)} run(s) starting")

    def release(self, run: str) -> bool:
        return self.booked.pop(run, None) is not None

    def bookings(self) -> dict[str, dict[str, float]]:
        now = time.monotonic()
        return {r: need for r, (need, until) in self.booked.items() if until > now}


def ledger() -> Any:
    """The cluster's ledger actor, created on first use (it needs no CPU). On the head node: a worker node
    may be lost or scaled away (an autoscaler counts a node holding only zero-CPU actors as idle)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1, resources={"node:__internal_head__": 0.001})(
        ReservationLedger).options(name=LEDGER_NAME, namespace=NAMESPACE, lifetime="detached",
                                   get_if_exists=True).remote()


class Booking:
    """A run's side of the ledger: `try_book()` each poll until granted, `release()` once placed or ended."""

    def __init__(self, run: str, demand: dict[str, float], *, lease_s: float = 60.0):
        self.run, self.demand, self.lease_s = run, {k: v for k, v in demand.items() if v}, lease_s
        self.granted = False
        self.reason = ""
        self._ledger = ledger()

    def try_book(self) -> bool:
        import ray

        self.granted, self.reason = ray.get(self._ledger.book.remote(self.run, self.demand, self.lease_s))
        return self.granted

    def release(self) -> None:
        import ray

        if self.granted:
            try:
                ray.get(self._ledger.release.remote(self.run), timeout=30)
            except Exception:  # the lease lapses on its own
                pass
            self.granted = False
