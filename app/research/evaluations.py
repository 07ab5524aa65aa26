"""`evaluations.*`: evaluation results recorded per experiment (and optionally run and model), listed,
and aggregated per experiment.

Aggregates weight per-sample quantities by samples: accuracy and latency over all samples are
sum(value x samples) / sum(samples) over the evaluations that report them, not a mean of means.
Tokens and cost add up. Custom metrics (any numbers in `metrics`) get count/mean/min/max.
An evaluation belongs to its experiment: whoever may see the experiment may see it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import Field
from sqlalchemy import case, func, or_, select
from sqlmodel import Session, col

from app.api.auth import current_principal
from app.api.context import money, registry
from app.api.jsonrpc import NOT_FOUND, VALIDATION_FAILED, RPCError
from app.data import db
from app.data.tables import Evaluation, Experiment, RegisteredModel, RegistryMember
from app.research.common import ListParams, Strict, get_visible, invalid, page
from app.research.experiments import READ, WRITE, get_experiment, get_run


def evaluation_view(e: Evaluation) -> dict[str, Any]:
    return {"id": e.id, "experiment_id": e.experiment_id, "run_id": e.run_id, "model_id": e.model_id,
            "name": e.name, "dataset_id": e.dataset_id, "dataset_version": e.dataset_version, "samples": e.samples,
            "avg_latency_ms": e.avg_latency_ms, "tokens": e.tokens, "cost_usd": money(e.cost_usd),
            "accuracy": e.accuracy, "metrics": e.metrics, "created_by": e.created_by, "created_at": e.created_at}


class RecordParams(Strict):
    experiment_id: str = Field(min_length=1, max_length=64)
    run_id: str | None = Field(None, min_length=1, max_length=64)
    """a run of that experiment"""
    model_id: str | None = Field(None, min_length=1, max_length=64)
    """the registered model evaluated"""
    name: str = Field(min_length=1, max_length=256)
    """what was evaluated (benchmark, suite)"""
    dataset_id: str | None = Field(None, min_length=1, max_length=64)
    dataset_version: int | None = Field(None, ge=1, le=2**31 - 1)
    samples: int = Field(ge=0, le=2**31 - 1)
    avg_latency_ms: float | None = Field(None, ge=0)
    tokens: int = Field(0, ge=0, le=10**15)
    cost_usd: Decimal = Field(Decimal("0"), ge=0, le=Decimal("100000000"), decimal_places=6)
    accuracy: float | None = Field(None, ge=0.0, le=1.0)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=200)
    """custom metrics, name -> number"""


class ListEvaluations(ListParams):
    experiment_id: str | None = Field(None, min_length=1, max_length=64)
    run_id: str | None = Field(None, min_length=1, max_length=64)
    model_id: str | None = Field(None, min_length=1, max_length=64)


class AggregateParams(Strict):
    experiment_id: str = Field(min_length=1, max_length=64)
    run_id: str | None = Field(None, min_length=1, max_length=64)
    """only this run's evaluations"""
    model_id: str | None = Field(None, min_length=1, max_length=64)
    """only this model's evaluations"""


@registry.method("evaluations.record", params=RecordParams, mutates=True, permission=WRITE,
                 errors=(NOT_FOUND, VALIDATION_FAILED), summary="Record an evaluation result of an experiment")
def record(p: RecordParams, ctx: Any) -> dict[str, Any]:
    if (p.dataset_version is not None) and p.dataset_id is None:
        raise invalid("dataset_version", "needs dataset_id")
    with db.session_scope(ctx.engine) as s:
        exp = get_experiment(s, p.experiment_id)
        if p.run_id is not None:
            run, _ = get_run(s, p.run_id)
            if run.experiment_id != exp.id:
                raise RPCError(VALIDATION_FAILED, f"run_id: run {run.id} belongs to another experiment",
                               {"field": "run_id"})
        if p.model_id is not None:
            get_visible(s, RegisteredModel, p.model_id, "model")
        e = Evaluation(**p.model_dump(), created_by=current_principal().subject)
        s.add(e)
        s.flush()
        return evaluation_view(e)


def _visible_experiments() -> Any:
    me = current_principal()
    shared = select(RegistryMember.object_id).where(RegistryMember.kind == "experiment",
                                                    RegistryMember.subject == me.subject)
    query = select(Experiment.id).where(col(Experiment.deleted_at).is_(None))
    if not me.is_admin:
        query = query.where(or_(Experiment.owner == me.subject, col(Experiment.id).in_(shared)))
    return query


def _filtered(s: Session, query: Any, experiment_id: str | None, run_id: str | None, model_id: str | None) -> Any:
    if experiment_id is not None:
        get_experiment(s, experiment_id)
        query = query.where(Evaluation.experiment_id == experiment_id)
    else:
        query = query.where(col(Evaluation.experiment_id).in_(_visible_experiments()))
    if run_id is not None:
        get_run(s, run_id)
        query = query.where(Evaluation.run_id == run_id)
    if model_id is not None:
        get_visible(s, RegisteredModel, model_id, "model")
        query = query.where(Evaluation.model_id == model_id)
    return query


@registry.method("evaluations.list", params=ListEvaluations, permission=READ, errors=(NOT_FOUND,),
                 summary="Evaluations of an experiment, run or model, newest first (filters, cursor)")
def list_evaluations(p: ListEvaluations, ctx: Any) -> dict[str, Any]:
    if p.experiment_id is None and p.run_id is None and p.model_id is None:
        raise invalid("experiment_id", "give experiment_id, run_id or model_id")
    if p.tag is not None or p.status is not None:
        raise invalid("tag" if p.tag is not None else "status", "evaluations have none; filter by name (search)")
    with db.session_scope(ctx.engine) as s:
        query = _filtered(s, select(Evaluation), p.experiment_id, p.run_id, p.model_id)
        if p.owner is not None:
            query = query.where(Evaluation.created_by == p.owner)
        return page(s, query, Evaluation, p, kind=None, view=evaluation_view, key="evaluations")


def _totals(n: int, samples: int, tokens: int, cost: Any, lat_sum: float | None, lat_n: int,
            acc_sum: float | None, acc_n: int) -> dict[str, Any]:
    return {"evaluations": n, "samples": int(samples or 0), "tokens": int(tokens or 0),
            "cost_usd": money(Decimal(str(cost or 0))),
            "avg_latency_ms": float(lat_sum) / lat_n if lat_n else None,
            "accuracy": float(acc_sum) / acc_n if acc_n else None}


@registry.method("evaluations.aggregate", params=AggregateParams, permission=READ, errors=(NOT_FOUND,),
                 summary="Per-experiment totals: samples, sample-weighted latency and accuracy, tokens, cost, "
                         "custom metrics; also per model")
def aggregate(p: AggregateParams, ctx: Any) -> dict[str, Any]:
    has_lat = case((col(Evaluation.avg_latency_ms).is_not(None), Evaluation.samples), else_=0)
    has_acc = case((col(Evaluation.accuracy).is_not(None), Evaluation.samples), else_=0)
    columns = (Evaluation.model_id, func.count(), func.sum(Evaluation.samples), func.sum(Evaluation.tokens),
               func.sum(Evaluation.cost_usd), func.sum(Evaluation.avg_latency_ms * Evaluation.samples),
               func.sum(has_lat), func.sum(Evaluation.accuracy * Evaluation.samples), func.sum(has_acc))
    with db.session_scope(ctx.engine) as s:
        base = _filtered(s, select(*columns), p.experiment_id, p.run_id, p.model_id)
        groups = s.execute(base.group_by(Evaluation.model_id)).all()
        custom = s.execute(_filtered(s, select(Evaluation.metrics), p.experiment_id, p.run_id, p.model_id)).all()
    by_model = [{"model_id": g[0], **_totals(*g[1:])} for g in groups]
    sums = [sum((g[i] or 0) for g in groups) for i in range(1, 9)]
    metrics: dict[str, dict[str, float]] = {}
    for (values,) in custom:
        for name, value in (values or {}).items():
            if not isinstance(value, int | float):
                continue
            m = metrics.setdefault(name, {"count": 0, "sum": 0.0, "min": value, "max": value})
            m["count"] += 1
            m["sum"] += value
            m["min"], m["max"] = min(m["min"], value), max(m["max"], value)
    custom_out = {k: {"count": m["count"], "mean": m["sum"] / m["count"], "min": m["min"], "max": m["max"]}
                  for k, m in sorted(metrics.items())}
    return {"experiment_id": p.experiment_id, **_totals(*sums), "metrics": custom_out,
            "by_model": sorted(by_model, key=lambda g: g["model_id"] or "")}
