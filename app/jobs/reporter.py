"""The DB-backed reporter a run launched by the job API records itself through.

`python -m grpo.run --job-id ID --reporter app.jobs.reporter:DBReporter` builds it in the run's driver
(the Ray Job's entrypoint). It writes progress, metrics, cost, trajectories and checkpoints to the
database, asks the run to stop when the job's cancel flag is set, and marks the final status.
It is the only place where grpo (the engine) meets app (the control plane), and grpo never imports it.
"""

from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import Any

from grpo.config import GRPOConfig

log = logging.getLogger("app.jobs.reporter")

# How the engine's end states map onto the job's (status, stop_reason).
FINAL = {
    "completed": ("completed", None),
    "cancelled": ("cancelled", "cancelled"),
    "paused": ("paused", "paused"),
    "budget_exceeded": ("cancelled", "budget_exceeded"),
    "failed": ("failed", None),
}


class DBReporter:
    """Reporter (grpo.report.Reporter) writing to the job API's database."""

    def __init__(self, *, cfg: GRPOConfig, job_id: str | None, db_url: str | None = None,
                 check_interval_s: float = 1.0, webhooks: Any = None):
        from app.data.db import get_engine
        from app.settings import get_settings

        if not job_id:
            raise ValueError("DBReporter needs --job-id")
        self.job_id = job_id
        self.engine = get_engine(db_url or get_settings().db_url)
        self.check_interval_s = check_interval_s
        self._last_check = 0.0
        self._stop: str | None = None
        self.base_cost, self.budget, self.warned = Decimal("0"), None, 0
        from app.jobs.webhooks import Webhooks

        self.webhooks = webhooks or Webhooks.from_settings(get_settings())
        self.total_steps = cfg.num_steps
        self.rank_nodes: list[str] = []
        self._decile = 0

    def on_start(self, cfg: GRPOConfig, *, job_id: str | None) -> None:
        from app.data.db import get_job, session_scope

        with session_scope(self.engine) as s:
            job = get_job(s, job_id=self.job_id)
            # A resumed job keeps what its earlier runs cost; this run's cost adds to it.
            self.base_cost = job.cost_usd if job is not None else Decimal("0")
            self.budget = job.budget_usd if job is not None else None
            self.warned = job.budget_warned_pct if job is not None else 0
        log.info("job %s: run started (%d steps)", self.job_id, cfg.num_steps)

    def _cost(self, run_cost: float) -> Decimal:
        return self.base_cost + Decimal(str(round(run_cost, 6)))

    def on_step(self, metrics: dict[str, float]) -> None:
        from app.data.db import record_progress, session_scope, set_status
        from app.data.tables import AuditEntry
        from app.research.series import record_job_metrics

        cost = self._cost(metrics.get("cost_usd", 0.0))
        shown = {**metrics, "rank_nodes": self.rank_nodes} if self.rank_nodes else metrics
        with session_scope(self.engine) as s:
            job = record_progress(s, job_id=self.job_id, step=int(metrics["step"]), metrics=shown, cost_usd=cost)
            # the runs linked to this job (runs.create with job_id) get the step as metric series
            record_job_metrics(s, job_id=self.job_id, step=int(metrics["step"]), metrics=metrics)
            if self.budget:
                used = int(100 * cost / self.budget)
                for pct in (75, 90):
                    if used >= pct > self.warned:  # recorded once per level (the job API's budget warning)
                        self.warned = pct
                        set_status(s, job_id=self.job_id, status=job.status, budget_warned_pct=pct)
                        # audited with the cost it was crossed at (audit.query method=training.budget.warning)
                        s.add(AuditEntry(principal="system", auth_method="local", method="training.budget.warning",
                                         target=self.job_id, outcome="ok",
                                         params={"percent": pct, "cost_usd": str(cost), "budget_usd": str(self.budget),
                                                 "step": int(metrics["step"])}))
                        log.warning("job %s has used %d%% of its budget (%s of %s USD)", self.job_id, pct, cost,
                                    self.budget)
                        self.webhooks.emit("training.budget.warning", {
                            "job_id": self.job_id, "percent": pct, "cost_usd": str(cost),
                            "budget_usd": str(self.budget)})
        decile = int(10 * metrics["step"] / max(self.total_steps, 1))
        if decile > self._decile:  # every 10 % of the iterations
            self._decile = decile
            self.webhooks.emit("training.job.progress", {
                "job_id": self.job_id, "iteration": int(metrics["step"]), "total_iterations": self.total_steps,
                "avg_reward": metrics.get("reward_mean"), "cost_usd": str(cost)})

    def on_trajectories(self, rows: list[dict[str, Any]]) -> None:
        from app.data.db import add_trajectories, session_scope

        # Multi-turn rows carry their steps (observation, action, tool result, reward, timestamp,
        # duration) as the engine recorded them; model text may hold NULs, which PostgreSQL refuses.
        rows = [dict(r, steps=_without_nul(r["steps"])) if r.get("steps") else r for r in rows]
        with session_scope(self.engine) as s:
            add_trajectories(s, job_id=self.job_id, rows=rows)

    def on_placed(self, rank_nodes: list[str]) -> None:
        """Where this attempt's policy ranks run: kept with every step's metrics (get_status's rank_nodes)."""
        self.rank_nodes = list(rank_nodes)

    def on_waiting(self, reason: str | None) -> None:
        """The run waits for resources, holding none (grpo.gang): shown as its `admission` by get_status."""
        from app.data.db import get_job, session_scope, set_status
        from app.data.tables import utcnow

        with session_scope(self.engine) as s:
            job = get_job(s, job_id=self.job_id)
            if job is None:
                return
            admission = {**((job.metrics or {}).get("admission") or {}),
                         "decision": "waiting" if reason else "started",
                         "reason": reason or "the run booked everything it needs", "decided_at": utcnow().isoformat()}
            set_status(s, job_id=self.job_id, status=job.status, metrics={**(job.metrics or {}), "admission": admission})

    def on_resume(self, step: int) -> None:
        """The run (re)started after `step`: trajectories an earlier attempt stored for later steps go, so
        the re-run steps are stored once."""
        from app.data.db import discard_steps_after, session_scope

        with session_scope(self.engine) as s:
            gone = discard_steps_after(s, job_id=self.job_id, step=step)
        if gone:
            log.info("job %s resumed after step %d: dropped %d trajectories of the lost attempt", self.job_id,
                     step, gone)

    def should_stop(self) -> str | None:
        """The job's cancel flag, read at most once per check interval (one small query)."""
        if self._stop is None and time.monotonic() - self._last_check >= self.check_interval_s:
            from app.data.db import get_job, session_scope

            self._last_check = time.monotonic()
            with session_scope(self.engine) as s:
                job = get_job(s, job_id=self.job_id)
                if job is not None and job.cancel_requested:
                    self._stop = "paused" if job.stop_reason == "paused" else "cancelled"
        return self._stop

    def on_end(self, status: str, *, error: str | None, summary: dict[str, Any]) -> None:
        from app.data.db import (
            add_checkpoint,
            finish_job,
            get_job,
            record_progress,
            session_scope,
            set_best_checkpoint,
            set_status,
        )

        job_status, reason = FINAL.get(status, ("failed", None))
        with session_scope(self.engine) as s:
            best = summary.get("best_checkpoints") or []  # best first (grpo.run.rank_checkpoints)
            scores = summary.get("checkpoint_scores") or {}
            latest = summary.get("checkpoint")
            ids: dict[str, str] = {}
            for path in dict.fromkeys([*best, *([latest] if latest else [])]):
                step = _step_of(path)
                ids[path] = add_checkpoint(s, job_id=self.job_id, step=step, path=path,
                                           eval_reward=scores.get(path)).id
            if best or latest:
                # The highest eval_reward (a tie: the later step); without scores the newest checkpoint.
                chosen = max(scores, key=lambda p: (scores[p], _step_of(p))) if scores else (best[0] if best else latest)
                set_best_checkpoint(s, job_id=self.job_id, checkpoint_id=ids[chosen])
            last = summary.get("last_metrics") or {}
            if last:  # with the Ray node of each policy rank (get_status's rank_nodes)
                record_progress(s, job_id=self.job_id, step=int(last.get("step", 0)),
                                metrics={**last, "rank_nodes": list(summary.get("rank_nodes") or [])},
                                cost_usd=self._cost(summary.get("cost_usd", 0.0)))
            if job_status == "paused":
                set_status(s, job_id=self.job_id, status="paused")
            else:
                # A reason given to training.cancel wins over the generic one.
                current = get_job(s, job_id=self.job_id)
                if job_status == "cancelled" and current is not None and current.stop_reason:
                    reason = current.stop_reason
                finish_job(s, job_id=self.job_id, status=job_status, error_message=error, stop_reason=reason)
            from app.data.tables import TrainingJob
            from app.research.series import record_job_end

            ended = s.get(TrainingJob, self.job_id, populate_existing=True)
            record_job_end(s, job_id=self.job_id, job_status=job_status, error=error,
                           final_metrics=ended.metrics if ended is not None else {})
        with session_scope(self.engine) as s:
            final = get_job(s, job_id=self.job_id)
        if final is not None and final.status in ("completed", "failed", "cancelled"):
            self.webhooks.emit(f"training.job.{final.status}", {
                "job_id": self.job_id, "iterations": final.current_iteration, "cost_usd": str(final.cost_usd),
                "stop_reason": final.stop_reason, "error_message": final.error_message,
                "best_checkpoint_id": final.best_checkpoint_id})
        self.webhooks.flush()
        log.info("job %s: run ended %s", self.job_id, status)


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {k: _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def _step_of(checkpoint_path: str) -> int:
    """The step saved in a checkpoint's trainer state, a folder or a URL (0 if unreadable)."""
    import io

    import torch

    from grpo import storage

    try:
        data = storage.read_bytes(storage.join(checkpoint_path, "trainer_state.pt"))
        return int(torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)["step"])
    except (OSError, KeyError, RuntimeError, ValueError, EOFError) as e:
        log.warning("cannot read the step of checkpoint %s: %s", checkpoint_path, e)
        return 0
