"""`metrics.*`: write, query (downsampled in the database) and aggregate a run's metric series.

The storage and its SQL are in app.research.series; runs linked to a training job get its metrics
from the job's run (app.jobs.reporter) without going through these methods.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import Field, field_validator
from sqlalchemy import select
from sqlmodel import Session, col

from app.api.context import registry
from app.api.jsonrpc import NOT_FOUND, VALIDATION_FAILED, RPCError
from app.data import db
from app.data.tables import MetricSeries, utcnow
from app.research.common import Strict, invalid
from app.research.experiments import READ, WRITE, get_run
from app.research.series import aggregate_series, query_series, write_metrics

MAX_STEP = 2**62


# ---- methods -----------------------------------------------------------------------------------

class PointIn(Strict):
    name: str = Field(min_length=1, max_length=256)
    """metric name"""
    step: int = Field(ge=0, le=MAX_STEP)
    value: float
    timestamp: datetime | None = None
    """when it was measured; the server's clock when left out"""


class LogParams(Strict):
    run_id: str = Field(min_length=1, max_length=64)
    points: list[PointIn] = Field(min_length=1, max_length=10_000)
    """at most 10,000 points per call; a (name, step) sent twice keeps the last value"""


class RangeParams(Strict):
    run_id: str = Field(min_length=1, max_length=64)
    names: list[str] | None = Field(None, min_length=1, max_length=100)
    """metrics to read; all of the run's when left out"""
    step_from: int | None = Field(None, ge=0, le=MAX_STEP)
    step_to: int | None = Field(None, ge=0, le=MAX_STEP)
    time_from: datetime | None = None
    """inclusive"""
    time_to: datetime | None = None
    """exclusive"""

    @field_validator("time_from", "time_to")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        return v.replace(tzinfo=UTC) if v is not None and v.tzinfo is None else v

    def range(self) -> dict[str, Any]:
        if self.step_from is not None and self.step_to is not None and self.step_from > self.step_to:
            raise invalid("step_from", "must not exceed step_to")
        if self.time_from is not None and self.time_to is not None and self.time_from >= self.time_to:
            raise invalid("time_from", "must be before time_to")
        return {"step_from": self.step_from, "step_to": self.step_to, "time_from": self.time_from,
                "time_to": self.time_to}


class QueryParams(RangeParams):
    max_points: int = Field(500, ge=2, le=10_000)
    """at most this many points per metric; a longer range is downsampled into step buckets"""


class RunParams(Strict):
    run_id: str = Field(min_length=1, max_length=64)


def _series_of(s: Session, run_id: str, names: list[str] | None) -> dict[str, int]:
    query = select(MetricSeries.name, MetricSeries.id).where(MetricSeries.run_id == run_id)
    if names is not None:
        query = query.where(col(MetricSeries.name).in_(names))
    found = dict(s.execute(query.order_by(MetricSeries.name)).all())
    if names is not None and (unknown := [n for n in names if n not in found]):
        raise RPCError(NOT_FOUND, f"names: run {run_id} has no metric {unknown[0]!r}",
                       {"field": "names", "unknown": unknown})
    return found


@registry.method("metrics.log", params=LogParams, mutates=True, permission=WRITE,
                 errors=(NOT_FOUND, VALIDATION_FAILED), summary="Write metric points of a running run (batch)")
def log_metrics(p: LogParams, ctx: Any) -> dict[str, Any]:
    now = utcnow()
    with db.session_scope(ctx.engine) as s:
        run, _ = get_run(s, p.run_id)
        if run.status != "running":
            raise RPCError(VALIDATION_FAILED, f"run {run.id} is {run.status}; metrics are written while it runs",
                           {"field": "run_id", "status": run.status})
        written = write_metrics(s, run.id, [(q.name, q.step, q.value, q.timestamp or now) for q in p.points])
    return {"run_id": p.run_id, "written": written}


@registry.method("metrics.query", params=QueryParams, permission=READ, errors=(NOT_FOUND,),
                 summary="Points of a run's metrics in a step or time range, downsampled in the database")
def query_metrics(p: QueryParams, ctx: Any) -> dict[str, Any]:
    rng = p.range()
    with db.session_scope(ctx.engine) as s:
        get_run(s, p.run_id)
        series = _series_of(s, p.run_id, p.names)
        return {"run_id": p.run_id, "series": [{"name": name, **query_series(s, sid, max_points=p.max_points, **rng)}
                                               for name, sid in series.items()]}


@registry.method("metrics.aggregate", params=RangeParams, permission=READ, errors=(NOT_FOUND,),
                 summary="count, min, max, mean and last of a run's metrics in a range")
def aggregate_metrics(p: RangeParams, ctx: Any) -> dict[str, Any]:
    rng = p.range()
    with db.session_scope(ctx.engine) as s:
        get_run(s, p.run_id)
        series = _series_of(s, p.run_id, p.names)
        stats = aggregate_series(s, list(series.values()), **rng)
        empty = {"count": 0, "min": None, "max": None, "mean": None, "first_step": None, "last_step": None,
                 "last": None}
        return {"run_id": p.run_id, "metrics": {name: stats.get(sid, empty) for name, sid in series.items()}}


@registry.method("metrics.list", params=RunParams, permission=READ, errors=(NOT_FOUND,),
                 summary="The metric names of a run with their point counts and step ranges")
def list_metrics(p: RunParams, ctx: Any) -> dict[str, Any]:
    with db.session_scope(ctx.engine) as s:
        get_run(s, p.run_id)
        series = _series_of(s, p.run_id, None)
        stats = aggregate_series(s, list(series.values()))
        return {"run_id": p.run_id, "metrics": [
            {"name": name, "count": stats.get(sid, {}).get("count", 0),
             "first_step": stats.get(sid, {}).get("first_step"), "last_step": stats.get(sid, {}).get("last_step")}
            for name, sid in series.items()]}
