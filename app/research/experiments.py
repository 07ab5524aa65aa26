"""`experiments.*` and `runs.*`: experiments with their state machine, and numbered runs under them.

An experiment moves draft -> active <-> paused -> completed | failed -> archived
(app.data.tables.EXPERIMENT_TRANSITIONS); any other move is refused with -40002 naming the allowed ones.
Runs are created while the experiment is active, numbered 1, 2, ... per experiment, and end once:
completed (with final metrics) or failed (with an error). A run linked to a training job is ended by
the job's run itself (app.jobs.reporter -> app.research.series.record_job_end).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from sqlalchemy import select
from sqlmodel import Session, col

from app.api.auth import current_principal
from app.api.context import registry
from app.api.jsonrpc import FORBIDDEN, NOT_FOUND, VALIDATION_FAILED, RPCError
from app.data import db
from app.data.tables import EXPERIMENT_TRANSITIONS, Experiment, ExperimentStatus, Run, utcnow
from app.research.common import (
    IdParams,
    Labels,
    ListParams,
    Strict,
    apply_update,
    get_visible,
    invalid,
    not_found,
    page,
    set_labels,
    soft_delete,
    touch,
)

KIND = "experiment"
READ, WRITE = "experiments:read", "experiments:write"


def experiment_view(e: Experiment) -> dict[str, Any]:
    return {"id": e.id, "name": e.name, "description": e.description, "hypothesis": e.hypothesis,
            "owner": e.owner, "collaborators": e.collaborators, "tags": e.tags, "config": e.config,
            "metadata": e.meta, "status": e.status, "run_count": e.run_count,
            "allowed_transitions": sorted(EXPERIMENT_TRANSITIONS[e.status]),
            "created_at": e.created_at, "updated_at": e.updated_at}


def run_view(r: Run) -> dict[str, Any]:
    return {"id": r.id, "experiment_id": r.experiment_id, "number": r.number, "name": r.name, "status": r.status,
            "job_id": r.job_id, "config": r.config, "final_metrics": r.final_metrics,
            "error_message": r.error_message, "created_by": r.created_by, "created_at": r.created_at,
            "finished_at": r.finished_at}


def get_experiment(s: Session, experiment_id: str, *, lock: bool = False) -> Experiment:
    return get_visible(s, Experiment, experiment_id, KIND, lock=lock)


def get_run(s: Session, run_id: str) -> tuple[Run, Experiment]:
    """The run and its experiment, if the caller may see the experiment."""
    run = s.get(Run, run_id)
    if run is None:
        raise not_found("run", run_id)
    try:
        return run, get_experiment(s, run.experiment_id)
    except RPCError:
        raise not_found("run", run_id) from None


# ---- experiments -------------------------------------------------------------------------------

class ExperimentFields(Labels):
    description: str | None = Field(None, max_length=100_000)
    hypothesis: str | None = Field(None, max_length=100_000)
    """what the experiment is meant to show"""
    config: dict[str, Any] | None = None
    """settings shared by the experiment's runs"""
    metadata: dict[str, Any] | None = None
    """anything else worth keeping"""


class CreateExperiment(ExperimentFields):
    name: str = Field(min_length=1, max_length=256)


class UpdateExperiment(ExperimentFields):
    id: str = Field(min_length=1, max_length=64)
    name: str | None = Field(None, min_length=1, max_length=256)


class TransitionParams(Strict):
    id: str = Field(min_length=1, max_length=64)
    status: ExperimentStatus
    """the state to move to"""


@registry.method("experiments.create", params=CreateExperiment, mutates=True, permission=WRITE,
                 summary="Create an experiment (draft); the caller owns it")
def create_experiment(p: CreateExperiment, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        e = Experiment(name=p.name, description=p.description, hypothesis=p.hypothesis,
                       owner=current_principal().subject, config=p.config or {}, meta=p.metadata or {})
        s.add(e)
        set_labels(s, KIND, e, tags=p.tags or [], collaborators=p.collaborators or [])
        s.flush()
        return experiment_view(e)


@registry.method("experiments.get", params=IdParams, permission=READ, errors=(NOT_FOUND,),
                 summary="An experiment")
def get_experiment_method(p: IdParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        return experiment_view(get_experiment(s, p.id))


@registry.method("experiments.update", params=UpdateExperiment, mutates=True, permission=WRITE,
                 errors=(NOT_FOUND, VALIDATION_FAILED, FORBIDDEN),
                 summary="Change an experiment's fields (fields left out stay); archived ones are read-only")
def update_experiment(p: UpdateExperiment, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        e = get_experiment(s, p.id, lock=True)
        if e.status == ExperimentStatus.archived:
            raise RPCError(VALIDATION_FAILED, f"experiment {e.id} is archived and read-only",
                           {"id": e.id, "status": e.status})
        if p.metadata is not None:
            e.meta = p.metadata
        apply_update(s, KIND, e, p, ("name", "description", "hypothesis", "config"))
        return experiment_view(e)


@registry.method("experiments.delete", params=IdParams, mutates=True, permission=WRITE,
                 errors=(NOT_FOUND, FORBIDDEN),
                 summary="Delete an experiment (soft: its runs, series and evaluations are kept)")
def delete_experiment(p: IdParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        e = get_experiment(s, p.id, lock=True)
        return soft_delete(s, e)


@registry.method("experiments.list", params=ListParams, permission=READ,
                 summary="Experiments the caller owns or collaborates on, newest first (filters, cursor)")
def list_experiments(p: ListParams, ctx: Any) -> dict[str, Any]:
    if p.status is not None and p.status not in EXPERIMENT_TRANSITIONS:
        raise invalid("status", f"one of {', '.join(EXPERIMENT_TRANSITIONS)}")
    with db.session_scope(ctx.engine) as s:
        return page(s, select(Experiment), Experiment, p, kind=KIND, view=experiment_view, key="experiments")


@registry.method("experiments.transition", params=TransitionParams, mutates=True, permission=WRITE,
                 errors=(NOT_FOUND, VALIDATION_FAILED),
                 summary="Move an experiment along draft -> active <-> paused -> completed | failed -> archived")
def transition(p: TransitionParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        e = get_experiment(s, p.id, lock=True)
        allowed = sorted(EXPERIMENT_TRANSITIONS[e.status])
        if p.status not in allowed:
            hint = f"allowed: {', '.join(allowed)}" if allowed else "it is final"
            raise RPCError(VALIDATION_FAILED, f"status: experiment {e.id} cannot go from {e.status} to "
                           f"{p.status} ({hint})",
                           {"field": "status", "from": e.status, "to": p.status, "allowed": allowed})
        e.status = p.status
        touch(e)
        s.add(e)
        return experiment_view(e)


# ---- runs --------------------------------------------------------------------------------------

class CreateRun(Strict):
    experiment_id: str = Field(min_length=1, max_length=64)
    name: str | None = Field(None, min_length=1, max_length=256)
    job_id: str | None = Field(None, min_length=1, max_length=64)
    """a training job whose progress metrics stream into this run's series and whose end ends the run"""
    config: dict[str, Any] | None = None


class ListRuns(ListParams):
    experiment_id: str = Field(min_length=1, max_length=64)
    """the experiment whose runs to list (`owner` filters on who created the run)"""


class CompleteRun(Strict):
    id: str = Field(min_length=1, max_length=64)
    final_metrics: dict[str, float] = Field(default_factory=dict, max_length=1000)
    """name -> number, shown on the run"""


class FailRun(Strict):
    id: str = Field(min_length=1, max_length=64)
    error: str = Field(min_length=1, max_length=10_000)
    """what went wrong"""


RUN_STATES = ("running", "completed", "failed")


@registry.method("runs.create", params=CreateRun, mutates=True, permission=WRITE,
                 errors=(NOT_FOUND, VALIDATION_FAILED),
                 summary="Start a run under an active experiment (numbered per experiment), optionally a job's")
def create_run(p: CreateRun, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        e = get_experiment(s, p.experiment_id, lock=True)
        if e.status != ExperimentStatus.active:
            raise RPCError(VALIDATION_FAILED, f"experiment {e.id} is {e.status}; runs start only in an active "
                           "experiment (experiments.transition to active)",
                           {"field": "experiment_id", "status": e.status})
        if p.job_id is not None:
            job = db.get_job(s, job_id=p.job_id)
            if job is None or not current_principal().owns(job.owner):
                raise RPCError(NOT_FOUND, f"job not found: {p.job_id}", {"field": "job_id", "job_id": p.job_id})
        e.run_count += 1
        touch(e)
        run = Run(experiment_id=e.id, number=e.run_count, name=p.name, job_id=p.job_id, config=p.config or {},
                  created_by=current_principal().subject)
        s.add_all([e, run])
        s.flush()
        return run_view(run)


@registry.method("runs.get", params=IdParams, permission=READ, errors=(NOT_FOUND,), summary="A run")
def get_run_method(p: IdParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        return run_view(get_run(s, p.id)[0])


@registry.method("runs.list", params=ListRuns, permission=READ, errors=(NOT_FOUND,),
                 summary="Runs of an experiment, newest first (filters, cursor)")
def list_runs(p: ListRuns, ctx: Any) -> dict[str, Any]:
    if p.status is not None and p.status not in RUN_STATES:
        raise invalid("status", f"one of {', '.join(RUN_STATES)}")
    if p.tag is not None:
        raise invalid("tag", "runs have no tags; filter experiments by tag")
    with db.session_scope(ctx.engine) as s:
        get_experiment(s, p.experiment_id)
        query = select(Run).where(Run.experiment_id == p.experiment_id)
        if p.owner is not None:
            query = query.where(col(Run.created_by) == p.owner)
        return page(s, query, Run, p, kind=None, view=run_view, key="runs")


def _end_run(s: Session, run_id: str, status: str) -> Run:
    run, _ = get_run(s, run_id)
    if run.status != "running":
        raise RPCError(VALIDATION_FAILED, f"status: run {run.id} is {run.status}; only a running run can be "
                       f"marked {status}", {"field": "status", "from": run.status, "to": status})
    return run


@registry.method("runs.complete", params=CompleteRun, mutates=True, permission=WRITE,
                 errors=(NOT_FOUND, VALIDATION_FAILED), summary="End a running run as completed, with final metrics")
def complete_run(p: CompleteRun, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        run = _end_run(s, p.id, "completed")
        run.status, run.final_metrics, run.finished_at = "completed", {**run.final_metrics, **p.final_metrics}, utcnow()
        s.add(run)
        return run_view(run)


@registry.method("runs.fail", params=FailRun, mutates=True, permission=WRITE,
                 errors=(NOT_FOUND, VALIDATION_FAILED), summary="End a running run as failed, with the error")
def fail_run(p: FailRun, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        run = _end_run(s, p.id, "failed")
        run.status, run.error_message, run.finished_at = "failed", p.error, utcnow()
        s.add(run)
        return run_view(run)
