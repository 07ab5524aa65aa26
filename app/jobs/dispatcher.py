"""The Dispatcher: takes queued jobs and runs each as a Ray Job; reconciles after a restart.

One instance runs as a named, detached Ray actor (`raygrpo-dispatcher` in namespace `raygrpo`).
Each job becomes `python -m grpo.run --config <job>/config.yaml --job-id ID --reporter
app.jobs.reporter:DBReporter` submitted to the Ray Jobs API with `submission_id` = the job id (a later
attempt after pause/resume gets `ID-a2`, ...), so every run shows in the Ray dashboard and `ray job
logs/stop` work. The run records its own progress through the reporter; the Dispatcher only
watches the Ray Job's state to finalise runs that died without reporting.

Admission: the next job (priority, then age) starts only when its whole demand (`job_demand`: the CPUs
and GPUs its run reserves) fits what the cluster can hold (its autoscaler's maximum where Ray knows it)
minus what the running jobs and other work take; `RAYGRPO_MAX_RUNNING_JOBS` stays an upper bound. A run
asks Ray for its actors one at a time, so two runs admitted by count alone could each take half of what
they need and wait for the rest forever. A job that needs more than the cluster can ever have is failed
with a message naming the missing resources. The decision and its reason are stored on the job
(`metrics["admission"]`) and shown by `training.get_status`.

Invariants: a job is submitted only after it was moved out of `queued` in the database (so two
dispatchers, or a restarted one, never run it twice), and every job that is `queued` in the
database is in the queue after `reconcile` (so nothing queued is lost). `tick()` does one round and
is what the tests drive; `serve_forever()` loops it in the actor.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from app.data import db
from app.data.tables import JobStatus, TrainingJob, utcnow
from app.settings import Settings
from grpo.config import GRPOConfig
from grpo.run import required_cpus

log = logging.getLogger("app.jobs.dispatcher")

ACTOR_NAME = "raygrpo-dispatcher"
NAMESPACE = "raygrpo"


def submission_id(job: TrainingJob) -> str:
    return job.id if job.attempts <= 1 else f"{job.id}-a{job.attempts}"


# ---- admission -----------------------------------------------------------------------------------
# Pure functions over plain dicts ({"CPU": 5.0, "GPU": 0.0}): what a job needs, what the cluster has,
# and whether the next job starts now, waits, or can never run here.

EPS = 1e-9  # fractional CPUs (0.5 per reward actor) add up with float error
SUBMIT_RETRY_S = 120.0  # how long a submission the Jobs API cannot take yet is tried again (_retry_submit)

RESOURCE_FIELDS = {
    "CPU": ("num_policy_workers", "num_rollout_workers", "cpus_per_worker", "num_reward_workers",
            "cpus_per_reward_worker"),
    "GPU": ("num_policy_workers", "num_rollout_workers", "gpus_per_worker"),
}
"""the engine config fields that make up each resource of a job's demand"""


def job_demand(cfg: GRPOConfig) -> dict[str, float]:
    """What `grpo.run` reserves for a run: every policy worker and rollout actor `cpus_per_worker` CPUs
    and `gpus_per_worker` GPUs, every reward actor `cpus_per_reward_worker` CPUs. The rest of a run
    (its driver, the Train controller, the weight board, the monitor) reserves nothing."""
    gpus = (cfg.num_policy_workers + cfg.num_rollout_workers) * cfg.gpus_per_worker
    return {"CPU": required_cpus(cfg), "GPU": gpus}


def stored_config(engine_config: dict[str, Any]) -> GRPOConfig:
    """A job's engine config as stored (validated when the job was accepted, so not again: a config
    stored by an older version must not stop the dispatcher); defaults for the keys it lacks."""
    return GRPOConfig.model_construct(**engine_config)


def demand_formula(cfg: GRPOConfig, resource: str) -> str:
    """How a demand is made up, with the config's numbers:
    `(num_policy_workers 2 + num_rollout_workers 2) x cpus_per_worker 1 + ...`."""
    v = {name: _num(getattr(cfg, name)) for name in RESOURCE_FIELDS[resource]}
    workers = f"(num_policy_workers {v['num_policy_workers']} + num_rollout_workers {v['num_rollout_workers']})"
    if resource == "GPU":
        return f"{workers} x gpus_per_worker {v['gpus_per_worker']}"
    return (f"{workers} x cpus_per_worker {v['cpus_per_worker']} + num_reward_workers "
            f"{v['num_reward_workers']} x cpus_per_reward_worker {v['cpus_per_reward_worker']}")


@dataclass(frozen=True)
class ClusterResources:
    """What the dispatcher knows of the cluster, per resource name ("CPU", "GPU")."""

    capacity: dict[str, float]
    """the most the cluster can ever have: its autoscaler's maximum where Ray knows it, else what it has"""
    in_use: dict[str, float] = field(default_factory=dict)
    """reserved right now by anything: runs, Serve replicas, Ray jobs not started by raygrpo"""


def ray_cluster_resources(settings: Settings) -> ClusterResources:
    """Ask the Ray cluster this process is connected to.

    The autoscaler's maximum comes from the cluster config it publishes in the GCS (autoscaler v2, as
    on KubeRay): the private function Ray Train and Ray Data use for the same question. Ray does not
    know it for the v1 autoscaler (`ray up` with a cluster YAML), so there capacity is what the cluster
    has now unless RAYGRPO_CLUSTER_CAPACITY names it; that setting wins for every resource it names.
    """
    import ray

    now, free = ray.cluster_resources(), ray.available_resources()
    capacity = {k: float(v) for k, v in now.items() if k in RESOURCE_FIELDS}
    try:
        from ray._private.state import state

        published = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # a private API of Ray: without it, count what the cluster has now
        log.warning("cannot read the autoscaler's maximum; counting the cluster as it is now", exc_info=True)
        published = {}
    for k, v in published.items():
        if k in RESOURCE_FIELDS:
            capacity[k] = max(capacity.get(k, 0.0), float(v))
    capacity.update({k: float(v) for k, v in settings.cluster_capacity.items()})
    in_use = {k: float(now[k]) - float(free.get(k, 0.0)) for k in RESOURCE_FIELDS if k in now}
    return ClusterResources(capacity=capacity, in_use=in_use)


def shortfall(demand: dict[str, float], capacity: dict[str, float]) -> dict[str, tuple[float, float]]:
    """The resources a job needs more of than the cluster can ever have: {name: (needed, at most)}."""
    return {k: (need, capacity.get(k, 0.0)) for k, need in demand.items()
            if need > EPS and need > capacity.get(k, 0.0) + EPS}


def cannot_fit_message(short: dict[str, tuple[float, float]]) -> str:
    """`cannot fit this cluster: needs 12 CPU, the cluster has at most 8 CPU`."""
    needs = " and ".join(f"{_num(need)} {k}" for k, (need, _) in short.items())
    has = " and ".join(f"{_num(most)} {k}" for k, (_, most) in short.items())
    return f"cannot fit this cluster: needs {needs}, the cluster has at most {has}"


@dataclass(frozen=True)
class Admission:
    """The dispatcher's decision on the job at the head of the queue, and why."""

    decision: Literal["started", "waiting", "refused"]
    reason: str
    demand: dict[str, float]

    def record(self) -> dict[str, Any]:
        """As stored on the job (`metrics["admission"]`) and shown by training.get_status."""
        return {"decision": self.decision, "reason": self.reason,
                "demand": {k: round(v, 6) for k, v in self.demand.items()},
                "decided_at": utcnow().isoformat()}


def admit(demand: dict[str, float], *, cluster: ClusterResources, running: list[dict[str, float]],
          max_running: int) -> Admission:
    """Whether the next job starts now, waits, or can never run on this cluster.

    `running` holds the demand of every job now running. Each is counted whole, even while its run is
    still starting and holds less: that is what keeps two runs from each holding half of what they
    need. What is in use beyond the running jobs' demand (Serve replicas, other Ray jobs) is taken too:
    free = capacity - max(running jobs' demand, in use now). While a run starts, in use now is less than
    it will be, so other work can be undercounted then; it is never counted twice.
    """
    need = {k: v for k, v in demand.items() if v > EPS}
    if short := shortfall(need, cluster.capacity):
        return Admission("refused", cannot_fit_message(short), demand)
    if len(running) >= max_running:
        return Admission("waiting", f"waiting for a slot: {len(running)} jobs are running, the most "
                                    f"RAYGRPO_MAX_RUNNING_JOBS allows", demand)
    held = {k: sum(r.get(k, 0.0) for r in running) for k in need}
    free = {k: cluster.capacity.get(k, 0.0) - max(held[k], cluster.in_use.get(k, 0.0)) for k in need}
    lacking = [k for k in need if need[k] > free[k] + EPS]
    if not lacking:
        fits = ", ".join(f"{_num(need[k])} {k} of {_num(free[k])} free" for k in need)
        return Admission("started", f"fits: needs {fits}", demand)
    parts = []
    for k in lacking:
        other = cluster.in_use.get(k, 0.0) - held[k]
        jobs = f"{len(running)} running job{'' if len(running) == 1 else 's'}"
        taken = f"{_num(held[k])} {k} reserved by {jobs}"
        if other > EPS:
            taken += f", {_num(other)} {k} in use by other work"
        parts.append(f"needs {_num(need[k])} {k}, free {_num(max(free[k], 0.0))} {k} of "
                     f"{_num(cluster.capacity.get(k, 0.0))} ({taken})")
    return Admission("waiting", "waiting for resources: " + "; ".join(parts), demand)


def _num(x: float) -> str:
    return f"{round(float(x), 3):g}"


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Failure)\b:?.*$")


def failure_cause(log: str, limit: int = 400) -> str:
    """A whole sentence for a failed run, cause first: the last exception line of its log (`error: ...`
    lines from `grpo.run` count too), else its last line. The traceback stays in the log."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line) or line.startswith("error: "):
            return line[:limit]
    return lines[-1][:limit] if lines else "the run left no log"


def died_silently(log: str) -> bool:
    """Whether a run's log ends without a cause of its own (no exception, no `error:` line from grpo.run): its
    driver was killed from outside, and running it again may well work."""
    return not any(_EXCEPTION_LINE.match(line.strip()) or line.strip().startswith("error: ")
                   for line in log.splitlines()[-200:])


def database_env(settings: Settings) -> dict[str, str]:
    """How a run's driver finds the database, with no password in the job's runtime env or entrypoint: a
    URL without one as is; else `DATABASE_URL_FILE`, naming the file the API itself read the URL from (a
    mounted Kubernetes Secret) or a private copy under `home/secrets` (home is shared with the drivers:
    they read their config.yaml from it)."""
    from sqlalchemy.engine import make_url

    url = settings.db_url
    if make_url(url).password is None:
        return {"DATABASE_URL": url}
    # DATABASE_URL set empty: a variable the cluster's processes inherited must not win over the file.
    given = os.environ.get("DATABASE_URL_FILE")
    if given and not os.environ.get("DATABASE_URL") and Path(given).is_file():
        return {"DATABASE_URL": "", "DATABASE_URL_FILE": str(Path(given).resolve())}
    folder = settings.home / "secrets"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / "database-url"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(url)
    path.chmod(0o600)
    return {"DATABASE_URL": "", "DATABASE_URL_FILE": str(path)}


class Dispatcher:
    def __init__(self, settings: Settings, *, jobs_client: Any = None,
                 capacity: Callable[[], ClusterResources] | None = None, poll_s: float = 1.0,
                 autostart: bool = False, periodic: Sequence[Callable[[Any], dict[str, str]]] = ()):
        """`jobs_client`: the Ray Jobs API (a JobSubmissionClient); `capacity`: what the cluster can
        hold (`ray_cluster_resources` of the cluster this runs on). Tests pass fakes of both.
        `periodic`: reconcilers the composition root hands in (the policy deployments'), each called with the
        database engine at start and every `deployment_reconcile_s`; -> {name: what was done}."""
        from app.api.context import Context

        ctx = Context.open(settings)
        self.settings, self.engine, self.queue = settings, ctx.engine, ctx.queue
        self.submit_failures: dict[str, float] = {}
        """job id -> when its submission first failed for a reason that may pass (_retry_submit)"""
        if jobs_client is None:
            # Without a configured URL: the cluster this actor runs on (its GCS names its dashboard), never
            # whatever cluster was started last on the machine.
            import ray
            from ray.job_submission import JobSubmissionClient

            jobs_client = JobSubmissionClient(settings.ray_dashboard_url or ray.get_runtime_context().gcs_address)
        self.client = jobs_client
        self.capacity = capacity or (lambda: ray_cluster_resources(settings))
        from app.jobs.webhooks import Webhooks

        self.webhooks = Webhooks.from_settings(settings)
        self.poll_s = poll_s
        self.periodic = list(periodic)
        self._stop = threading.Event()
        self._wake = threading.Event()  # a job was queued: the next round now, not at the next poll
        self._thread: threading.Thread | None = None
        if autostart:  # as an actor: also after Ray restarts it, reconcile and loop again
            self.start()

    # ---- the loop --------------------------------------------------------------------------------
    def start(self) -> bool:
        """Reconcile, then loop in a background thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._create_ledger()
            self.reconcile()
            self._thread = threading.Thread(target=self.serve_forever, name="dispatcher", daemon=True)
            self._thread.start()
        return True

    def serve_forever(self) -> None:
        next_reconcile = 0.0
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bad round must not kill the dispatcher; the next round retries
                log.exception("dispatcher round failed")
            every = self.settings.deployment_reconcile_s
            if every and self.periodic and time.monotonic() >= next_reconcile:
                next_reconcile = time.monotonic() + every
                self.run_periodic()
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def wake(self) -> None:
        """Start the next round now (a job was just queued or resumed) rather than at the next poll."""
        self._wake.set()

    @staticmethod
    def _create_ledger() -> None:
        """The cluster's reservation ledger (grpo.gang), made now rather than by the first run's driver, which
        would wait for its process to start before asking for anything (a run's workers cannot reuse idle
        processes: the job's runtime env differs)."""
        import ray

        if not ray.is_initialized():
            return
        try:
            from grpo.gang import ledger

            ledger()
        except Exception:  # the first run makes it then
            log.exception("could not create the reservation ledger")

    def run_periodic(self) -> dict[str, str]:
        """The reconcilers once (e.g. policy deployments the database holds and Serve lost, deployed again)."""
        done: dict[str, str] = {}
        for fn in self.periodic:
            try:
                done |= fn(self.engine) or {}
            except Exception:  # one failing round is logged; the next one tries again
                log.exception("reconciler %s failed", getattr(fn, "__qualname__", fn))
        for name, outcome in done.items():
            log.warning("policy deployment %s was not running on Serve: %s", name, outcome)
        return done

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def ping(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def tick(self) -> dict[str, list[str]]:
        """One round: finalise runs that ended without reporting, then start the queued jobs that fit."""
        finalised, acked, pushed = self.watch_running(), self.ack_finished(), self.push_missing()
        started, refused = self.launch()
        return {"finalised": finalised, "acked": acked, "pushed": pushed, "started": started,
                "refused": refused}

    def push_missing(self) -> list[str]:
        """Jobs queued in the database but in neither Redis list (an enqueue that failed after the job
        was stored, a flushed Redis): push them, so nothing queued waits for a restart."""
        if self.queue is None:
            return []
        with db.session_scope(self.engine) as s:
            queued = db.jobs_in_states(s, states=[JobStatus.queued])
        known = set(self.queue.queued()) | set(self.queue.processing())
        missing = [job for job in queued if job.id not in known]
        for job in missing:
            self.queue.push(job.id, priority=job.priority)
        return [job.id for job in missing]

    def ack_finished(self) -> list[str]:
        """Drop jobs that left `running` (the run reported its end, or it paused) from the processing list."""
        if self.queue is None:
            return []
        done = []
        with db.session_scope(self.engine) as s:
            for job_id in self.queue.processing():
                job = db.get_job(s, job_id=job_id)
                if job is None or job.status == JobStatus.paused or JobStatus(job.status).is_final:
                    self.queue.ack(job_id)
                    if job is not None:
                        self.queue.set_status(job_id, job.status)
                    done.append(job_id)
        return done

    # ---- running jobs ----------------------------------------------------------------------------
    def _ray_status(self, sid: str | None) -> str | None:
        if not sid:
            return None
        try:
            return str(self.client.get_job_status(sid))
        except RuntimeError:  # the Jobs API does not know this submission
            return None

    def watch_running(self) -> list[str]:
        done = []
        with db.session_scope(self.engine) as s:
            running = db.jobs_in_states(s, states=[JobStatus.running])
        for job in running:
            status = self._ray_status(job.ray_submission_id)
            if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
                continue
            self._finalise(job, status)
            done.append(job.id)
        return done

    def _finalise(self, job: TrainingJob, ray_status: str) -> None:
        """A Ray Job ended; its reporter normally marked the outcome already. If not, do it here: a driver
        that died without a word (killed, out of memory, its node lost) is queued again to resume from its
        checkpoint, RAYGRPO_DRIVER_RESTARTS times at most; a run that said why it failed is failed."""
        again = False
        with db.session_scope(self.engine) as s:
            current = db.get_job(s, job_id=job.id)
            if current is not None and current.status == JobStatus.running:
                log_tail = self._log_tail(job.ray_submission_id, chars=20_000) if ray_status != "STOPPED" else ""
                restarts = int((current.metrics or {}).get("driver_restarts", 0))
                if ray_status == "STOPPED":
                    db.finish_job(s, job_id=job.id, status=JobStatus.cancelled, stop_reason="cancelled")
                elif ray_status == "FAILED" and died_silently(log_tail) and restarts < self.settings.driver_restarts \
                        and not current.cancel_requested:
                    db.set_status(s, job_id=job.id, status=JobStatus.queued,
                                  metrics={**(current.metrics or {}), "driver_restarts": restarts + 1})
                    again, priority = True, current.priority
                    log.warning("job %s: its driver died without reporting (Ray Job %s %s); queued again to resume "
                                "from its checkpoint (restart %d of %d)", job.id, job.ray_submission_id, ray_status,
                                restarts + 1, self.settings.driver_restarts)
                else:
                    cause = failure_cause(log_tail)
                    db.finish_job(s, job_id=job.id, status=JobStatus.failed,
                                  error_message=f"{cause} (the run's Ray Job ended {ray_status} without reporting; "
                                                f"its whole log: ray job logs {job.ray_submission_id})")
            final = None if again else (current.status if current is not None else None)
        if self.queue is not None:
            self.queue.ack(job.id)
            if again:
                self.queue.push(job.id, priority=priority)
                self.queue.set_status(job.id, JobStatus.queued)
            elif final:
                self.queue.set_status(job.id, final)

    def _log_tail(self, sid: str | None, chars: int = 2000) -> str:
        try:
            return self.client.get_job_logs(sid)[-chars:] if sid else ""
        except RuntimeError:
            return ""

    # ---- starting jobs ---------------------------------------------------------------------------
    def launch(self) -> tuple[list[str], list[str]]:
        """Start queued jobs in queue order while the next one fits; fail those that never can.

        Strict head of the line: when the next job does not fit, nothing behind it starts, even a
        smaller job that would fit. Letting small jobs pass could keep a big one waiting forever.
        Returns the ids started and the ids refused.
        """
        started, refused = [], []
        cluster: ClusterResources | None = None
        while (job := self._head()) is not None:
            with db.session_scope(self.engine) as s:
                running = [job_demand(stored_config(j.engine_config))
                           for j in db.jobs_in_states(s, states=[JobStatus.running])]
            cluster = cluster or self.capacity()  # asked once a round, and only when a job is queued
            cfg = stored_config(job.engine_config)
            verdict = admit(job_demand(cfg), cluster=cluster, running=running,
                            max_running=self.settings.max_running_jobs)
            if verdict.decision == "refused":
                made_of = "; ".join(f"{k} = {demand_formula(cfg, k)}"
                                    for k in shortfall(verdict.demand, cluster.capacity))
                if self._refuse(job, Admission("refused", f"{verdict.reason} ({made_of})", verdict.demand)):
                    refused.append(job.id)
                continue
            if verdict.decision == "waiting":
                self._note(job, verdict)
                break
            taken = self._take(job, verdict)
            if taken is None:  # cancelled meanwhile, or another job went ahead of it: the next round decides
                break
            if not self._submit(taken):  # the Jobs API cannot take it yet: back in the queue, next round
                break
            started.append(taken.id)
        return started, refused

    def _head(self) -> TrainingJob | None:
        """The next job in queue order (priority, then age) that is still queued, without taking it."""
        with db.session_scope(self.engine) as s:
            if self.queue is None:
                queued = db.jobs_in_states(s, states=[JobStatus.queued])  # oldest first
                return min(queued, key=lambda j: -j.priority, default=None)  # the oldest of the top priority
            for job_id in self.queue.queued():
                job = db.get_job(s, job_id=job_id)
                if job is not None and job.status == JobStatus.queued:
                    return job
                self.queue.remove(job_id)  # cancelled while queued, already running, or gone: not to start
        return None

    def _take(self, job: TrainingJob, verdict: Admission) -> TrainingJob | None:
        """Move `job` from queued to running (atomic: a job is taken once); None if it is not the one to take."""
        if self.queue is not None:
            popped = self.queue.pop()
            if popped != job.id:  # a job pushed since _head went ahead of it: put that one back
                if popped is not None:
                    self.queue.requeue(popped)
                return None
        with db.session_scope(self.engine) as s:
            taken = db.mark_running(s, job_id=job.id, ray_submission_id=f"{job.id}-pending")
            if taken is None:
                if self.queue is not None:
                    self.queue.ack(job.id)
                return None
            taken.ray_submission_id = submission_id(taken)
            taken.metrics = {**(taken.metrics or {}), "admission": verdict.record()}
            s.add(taken)
        log.info("job %s admitted: %s", job.id, verdict.reason)
        return taken

    def _retry_submit(self, job: TrainingJob, error: Exception) -> bool:
        """A submission the Jobs API could not take for now (a 5xx such as "No available agent to submit job,
        please try again later" while a head's dashboard agent starts, or no connection): the job goes back to
        the queue at its place, the same attempt, and is tried again next round, for up to SUBMIT_RETRY_S.
        False for a refusal that trying again cannot change (a 4xx), or once that time is spent."""
        text = str(error)
        first = self.submit_failures.setdefault(job.id, time.monotonic())
        if re.search(r"status code 4\d\d", text) or time.monotonic() - first > SUBMIT_RETRY_S:
            self.submit_failures.pop(job.id, None)
            return False
        reason = f"waiting for the Ray Jobs API, which cannot take the run yet ({text[:200]}); trying again"
        with db.session_scope(self.engine) as s:
            back = db.set_status(s, job_id=job.id, status=JobStatus.queued, only_from=[JobStatus.running],
                                 attempts=max(job.attempts - 1, 0), started_at=None,
                                 metrics={**(job.metrics or {}),
                                          "admission": Admission("waiting", reason, {}).record()})
        if back is None:  # cancelled meanwhile: nothing to retry
            self.submit_failures.pop(job.id, None)
            return True
        if self.queue is not None:
            self.queue.requeue(job.id)
        log.warning("job %s: %s", job.id, reason)
        return True

    def _note(self, job: TrainingJob, verdict: Admission) -> None:
        """Store why the next job waits, where training.get_status shows it (written only when it changes)."""
        current = (job.metrics or {}).get("admission") or {}
        if current.get("decision") == verdict.decision and current.get("reason") == verdict.reason:
            return
        with db.session_scope(self.engine) as s:
            db.set_status(s, job_id=job.id, status=JobStatus.queued, only_from=[JobStatus.queued],
                          metrics={**(job.metrics or {}), "admission": verdict.record()})
        log.info("job %s waits: %s", job.id, verdict.reason)

    def _refuse(self, job: TrainingJob, verdict: Admission) -> bool:
        """Fail a queued job the cluster can never hold; False if it is no longer queued."""
        message = verdict.reason
        with db.session_scope(self.engine) as s:  # one transaction: the record and the failure, or neither
            if db.set_status(s, job_id=job.id, status=JobStatus.queued, only_from=[JobStatus.queued],
                             metrics={**(job.metrics or {}), "admission": verdict.record()}) is None:
                return False
            db.finish_job(s, job_id=job.id, status=JobStatus.failed, error_message=message)
        if self.queue is not None:
            self.queue.remove(job.id)
            self.queue.set_status(job.id, JobStatus.failed)
        self.webhooks.emit("training.job.failed", {"job_id": job.id, "iterations": 0, "cost_usd": "0",
                                                   "stop_reason": None, "error_message": message,
                                                   "best_checkpoint_id": None})
        log.warning("job %s refused: %s", job.id, message)
        return True

    def _submit(self, job: TrainingJob) -> bool:
        """Submit the taken job as a Ray Job; False when the Jobs API could not take it yet (requeued)."""
        job_dir = self.settings.runs_dir / job.id  # the driver's files; the run's own may be at a storage URL
        job_dir.mkdir(parents=True, exist_ok=True)
        config_path = job_dir / "config.yaml"
        engine_config = dict(job.engine_config)
        if job.budget_usd is not None and job.cost_usd > 0:  # a resumed job may only spend what is left
            engine_config["max_budget_usd"] = max(float(job.budget_usd - job.cost_usd), 1e-6)
        config_path.write_text(yaml.safe_dump(engine_config, sort_keys=True))
        entrypoint = (f"{sys.executable} -m grpo.run --config {config_path} --job-id {job.id} "
                      f"--reporter app.jobs.reporter:DBReporter")
        # The job-level runtime env reaches every process of the run, the Train controller included:
        # its health-check poll is the floor under each ray.train.report (2 s by default).
        # Webhook URLs go along; no secret does (runtime envs show in the dashboard and `ray job list`):
        # the database URL by file when it holds a password, the webhook secret from the cluster's own
        # environment.
        env = {**database_env(self.settings), "RAYGRPO_HOME": str(self.settings.home),
               "RAYGRPO_WEBHOOK_URLS": ",".join(self.settings.webhook_urls),
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
               # Worker processes start slowly on a busy node; 60 s (Ray's default) failed runs there.
               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
               "RAYGRPO_JOB_ID": job.id, "RAYGRPO_LOG_FORMAT": self.settings.log_format}
        if os.environ.get("RAYGRPO_FAULT_HOOKS") == "1":  # tests that kill a run on purpose (grpo.run.FaultHook)
            env["RAYGRPO_FAULT_HOOKS"] = "1"
        try:
            self.client.submit_job(entrypoint=entrypoint, submission_id=job.ray_submission_id,
                                   runtime_env={"env_vars": env}, metadata={"job_id": job.id, "agent": job.agent_id})
            self.submit_failures.pop(job.id, None)
        except Exception as e:  # the Jobs API's RuntimeError (with its HTTP status), or no connection at all
            if "already exists" not in str(e):
                if self._retry_submit(job, e):
                    return False
                with db.session_scope(self.engine) as s:
                    db.finish_job(s, job_id=job.id, status=JobStatus.failed,
                                  error_message=f"could not submit the Ray Job: {e}")
                if self.queue is not None:
                    self.queue.ack(job.id)
                return True
        if self.queue is not None:
            self.queue.set_status(job.id, JobStatus.running)
        self.webhooks.emit("training.job.started", {"job_id": job.id, "agent_id": job.agent_id,
                                                    "ray_submission_id": job.ray_submission_id})
        log.info("job %s submitted as Ray Job %s", job.id, job.ray_submission_id)
        return True

    # ---- after a restart -------------------------------------------------------------------------
    def reconcile(self) -> dict[str, list[str]]:
        """Bring the queue and the database back in line with what Ray is running."""
        requeued, finalised = [], []
        with db.session_scope(self.engine) as s:
            running = db.jobs_in_states(s, states=[JobStatus.running])
        for job in running:
            status = self._ray_status(job.ray_submission_id)
            if status in ("PENDING", "RUNNING"):
                continue
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                self._finalise(job, status)
                finalised.append(job.id)
                continue
            # Taken from the queue but never submitted (the dispatcher died in between): run it again.
            with db.session_scope(self.engine) as s:
                db.set_status(s, job_id=job.id, status=JobStatus.queued)
            requeued.append(job.id)
        if self.queue is not None:
            for job_id in self.queue.processing():
                self.queue.requeue(job_id)
            self.push_missing()
        log.info("reconciled: requeued %s, finalised %s", requeued, finalised)
        return {"requeued": requeued, "finalised": finalised}


def wake_dispatcher() -> None:
    """Tell the dispatcher actor of this cluster that a job was queued (fire and forget). Without Ray, or with no
    dispatcher yet, nothing: its next poll finds the job."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:
        ray.get_actor(ACTOR_NAME, namespace=NAMESPACE).wake.remote()
    except Exception:  # noqa: BLE001 - no dispatcher (yet): it polls
        pass


def ensure_dispatcher(settings: Settings, periodic: Sequence[Callable[[Any], dict[str, str]]] = ()) -> Any:
    """The named dispatcher actor, created if missing (detached: it outlives the Serve replica)."""
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(Dispatcher)
    actor = cls.options(name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote(
        settings, autostart=True, periodic=list(periodic))
    ray.get(actor.ping.remote())
    return actor
