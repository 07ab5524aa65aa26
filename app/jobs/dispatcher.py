"""The Dispatcher: takes queued jobs and runs each as a Ray Job; reconciles after a restart.

One instance runs as a named, detached Ray actor (`raygrpo-dispatcher` in namespace `raygrpo`).
Each job becomes `python -m grpo.run --config <job>/config.yaml --job-id ID --reporter
app.jobs.reporter:DBReporter` submitted to the Ray Jobs API with `submission_id` = the job id (a later
attempt after pause/resume gets `ID-a2`, ...), so every run shows in the Ray dashboard and `ray job
logs/stop` work. The run records its own progress through the reporter; the Dispatcher only
watches the Ray Job's state to finalise runs that died without reporting.

Invariants: a job is submitted only after it was moved out of `queued` in the database (so two
dispatchers, or a restarted one, never run it twice), and every job that is `queued` in the
database is in the queue after `reconcile` (so nothing queued is lost). `tick()` does one round and
is what the tests drive; `serve_forever()` loops it in the actor.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from app.data import db
from app.data.tables import JobStatus, TrainingJob
from app.settings import Settings

log = logging.getLogger("app.jobs.dispatcher")

ACTOR_NAME = "raygrpo-dispatcher"
NAMESPACE = "raygrpo"


def submission_id(job: TrainingJob) -> str:
    return job.id if job.attempts <= 1 else f"{job.id}-a{job.attempts}"


class Dispatcher:
    def __init__(self, settings: Settings, *, jobs_client: Any = None, poll_s: float = 1.0, autostart: bool = False):
        from app.api.context import Context

        ctx = Context.open(settings)
        self.settings, self.engine, self.queue = settings, ctx.engine, ctx.queue
        if jobs_client is None:
            # Without a configured URL: the cluster this actor runs on (its GCS names its dashboard), never
            # whatever cluster was started last on the machine.
            import ray
            from ray.job_submission import JobSubmissionClient

            jobs_client = JobSubmissionClient(settings.ray_dashboard_url or ray.get_runtime_context().gcs_address)
        self.client = jobs_client
        from app.jobs.webhooks import Webhooks

        self.webhooks = Webhooks.from_settings(settings)
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if autostart:  # as an actor: also after Ray restarts it, reconcile and loop again
            self.start()

    # ---- the loop --------------------------------------------------------------------------------
    def start(self) -> bool:
        """Reconcile, then loop in a background thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self.reconcile()
            self._thread = threading.Thread(target=self.serve_forever, name="dispatcher", daemon=True)
            self._thread.start()
        return True

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bad round must not kill the dispatcher; the next round retries
                log.exception("dispatcher round failed")
            self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()

    def ping(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def tick(self) -> dict[str, list[str]]:
        """One round: finalise runs that ended without reporting, then start queued jobs."""
        return {"finalised": self.watch_running(), "acked": self.ack_finished(), "pushed": self.push_missing(),
                "started": self.launch()}

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
        """A Ray Job ended; its reporter normally marked the outcome already. If not, do it here."""
        with db.session_scope(self.engine) as s:
            current = db.get_job(s, job_id=job.id)
            if current is not None and current.status == JobStatus.running:
                if ray_status == "STOPPED":
                    db.finish_job(s, job_id=job.id, status=JobStatus.cancelled, stop_reason="cancelled")
                else:
                    tail = self._log_tail(job.ray_submission_id)
                    db.finish_job(s, job_id=job.id, status=JobStatus.failed,
                                  error_message=f"the run's Ray Job ended {ray_status} without reporting: {tail}")
            final = current.status if current is not None else None
        if self.queue is not None:
            self.queue.ack(job.id)
            if final:
                self.queue.set_status(job.id, final)

    def _log_tail(self, sid: str | None, chars: int = 2000) -> str:
        try:
            return self.client.get_job_logs(sid)[-chars:] if sid else ""
        except RuntimeError:
            return ""

    # ---- starting jobs ---------------------------------------------------------------------------
    def launch(self) -> list[str]:
        started = []
        while True:
            with db.session_scope(self.engine) as s:
                if len(db.jobs_in_states(s, states=[JobStatus.running])) >= self.settings.max_running_jobs:
                    break
            job = self._next_job()
            if job is None:
                break
            self._submit(job)
            started.append(job.id)
        return started

    def _next_job(self) -> TrainingJob | None:
        """Move the next job from queued to running in the database (atomic: a job is taken once)."""
        if self.queue is None:
            with db.session_scope(self.engine) as s:
                job = db.claim_next_job(s)
                if job is not None:
                    job.ray_submission_id = submission_id(job)
                    s.add(job)
                return job
        while (job_id := self.queue.pop()) is not None:
            with db.session_scope(self.engine) as s:
                job = db.get_job(s, job_id=job_id)
                if job is None or job.status != JobStatus.queued:  # cancelled while queued, or stale
                    self.queue.ack(job_id)
                    continue
                job = db.mark_running(s, job_id=job_id, ray_submission_id=f"{job_id}-pending")
                if job is None:
                    self.queue.ack(job_id)
                    continue
                job.ray_submission_id = submission_id(job)
                s.add(job)
                return job
        return None

    def _submit(self, job: TrainingJob) -> None:
        job_dir = Path(job.engine_config["output_dir"])
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
        # Webhook URLs go along; the signing secret does not (runtime envs show in the dashboard):
        # the run's driver reads it from the cluster's own environment.
        env = {"DATABASE_URL": self.settings.db_url, "RAYGRPO_HOME": str(self.settings.home),
               "RAYGRPO_WEBHOOK_URLS": ",".join(self.settings.webhook_urls),
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
               # Worker processes start slowly on a busy node; 60 s (Ray's default) failed runs there.
               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
               "RAYGRPO_JOB_ID": job.id, "RAYGRPO_LOG_FORMAT": self.settings.log_format}
        try:
            self.client.submit_job(entrypoint=entrypoint, submission_id=job.ray_submission_id,
                                   runtime_env={"env_vars": env}, metadata={"job_id": job.id, "agent": job.agent_id})
        except RuntimeError as e:
            if "already exists" not in str(e):
                with db.session_scope(self.engine) as s:
                    db.finish_job(s, job_id=job.id, status=JobStatus.failed,
                                  error_message=f"could not submit the Ray Job: {e}")
                if self.queue is not None:
                    self.queue.ack(job.id)
                return
        if self.queue is not None:
            self.queue.set_status(job.id, JobStatus.running)
        self.webhooks.emit("training.job.started", {"job_id": job.id, "agent_id": job.agent_id,
                                                    "ray_submission_id": job.ray_submission_id})
        log.info("job %s submitted as Ray Job %s", job.id, job.ray_submission_id)

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


def ensure_dispatcher(settings: Settings) -> Any:
    """The named dispatcher actor, created if missing (detached: it outlives the Serve replica)."""
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(Dispatcher)
    actor = cls.options(name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote(
        settings, autostart=True)
    ray.get(actor.ping.remote())
    return actor
