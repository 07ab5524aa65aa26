"""Storage of the metric time series of runs (the `metrics.*` methods are in app.research.metrics), and
the hooks through which a training job's run writes its progress into the series of the runs linked to
it (app.jobs.reporter). Nothing here imports the API, so a run's driver stays light.

Storage: `metric_series` names (run, metric) once; `metric_points` holds (series_id, step) -> value,
timestamp, with that pair as primary key, so a range of one metric is one index range scan. Writes
are batches: on PostgreSQL a COPY straight into the table, or, when the batch rewrites stored steps,
a COPY into a session-local temporary table followed by one `INSERT ... SELECT ... ON CONFLICT` (a
step written twice keeps the last value: a resumed job re-runs steps after its checkpoint);
elsewhere one multi-row `INSERT ... ON CONFLICT` per chunk.
Downsampling happens in SQL: the step range is cut into at most `max_points` equal buckets, and
each bucket comes back as min/max/mean/count and its last value, never as raw rows through Python.
`metric_rollups` keeps the same summary per block of ROLLUP_STEPS steps, recomputed from the points
for the blocks each write touches; buckets of at least one block are summed from it (plus the
points of the at most two blocks the range cuts at its ends), so a million-step range costs about a
thousand rollup rows and two thousand points instead of a million points.
bench/bench_metrics.py measures both on a million points.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col

from app.data.tables import MetricPoint, MetricSeries, Run, UTCDateTime, utcnow

SQLITE_CHUNK = 2000  # rows per multi-row INSERT: 4 params a row stays under SQLite's 32766 limit
COPY_THRESHOLD = 200  # below this many points a multi-row INSERT beats creating/filling the temp table
ROLLUP_STEPS = 1000
"""steps per metric_rollups block: a query whose buckets span at least this many steps reads blocks"""

Point = tuple[int, int, float, datetime]  # (series_id, step, value, timestamp)


# ---- storage -----------------------------------------------------------------------------------

def series_ids(s: Session, run_id: str, names: Iterable[str]) -> dict[str, int]:
    """The series id of each (run, name), created when missing (concurrent writers: one row wins)."""
    wanted = set(names)
    rows = s.execute(select(MetricSeries.name, MetricSeries.id).where(
        MetricSeries.run_id == run_id, col(MetricSeries.name).in_(wanted))).all()
    found = {name: sid for name, sid in rows}
    missing = wanted - found.keys()
    if missing:
        dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
        s.execute(dialect.insert(MetricSeries).on_conflict_do_nothing(),
                  [{"run_id": run_id, "name": n} for n in sorted(missing)])
        rows = s.execute(select(MetricSeries.name, MetricSeries.id).where(
            MetricSeries.run_id == run_id, col(MetricSeries.name).in_(missing))).all()
        found.update({name: sid for name, sid in rows})
    return found


def _naive_utc(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


def insert_points(s: Session, points: Sequence[Point]) -> int:
    """Write points, the last one winning for a repeated (series, step). Returns how many were written."""
    latest: dict[tuple[int, int], Point] = {}
    for p in points:
        latest[(p[0], p[1])] = p
    rows = list(latest.values())
    if not rows:
        return 0
    if s.get_bind().dialect.name == "postgresql" and len(rows) >= COPY_THRESHOLD:
        _copy_points(s, rows)
        _refresh_rollups(s, rows)
        return len(rows)
    dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
    for i in range(0, len(rows), SQLITE_CHUNK):
        chunk = [{"series_id": a, "step": b, "value": v, "ts": t} for a, b, v, t in rows[i:i + SQLITE_CHUNK]]
        stmt = dialect.insert(MetricPoint).values(chunk)
        s.execute(stmt.on_conflict_do_update(index_elements=["series_id", "step"],
                                             set_={"value": stmt.excluded.value, "ts": stmt.excluded.ts}))
    _refresh_rollups(s, rows)
    return len(rows)


def _refresh_rollups(s: Session, rows: list[Point]) -> None:
    """Recompute the rollup blocks the written points fall in, from the points themselves (so a
    rewritten step is reflected exactly). A contiguous batch of N steps rereads about N points."""
    spans: dict[int, tuple[int, int]] = {}
    for sid, step, _, _ in rows:
        lo, hi = spans.get(sid, (step, step))
        spans[sid] = (min(lo, step), max(hi, step))
    r = ROLLUP_STEPS
    for sid, (lo, hi) in spans.items():
        # ROLLUP_STEPS is a constant of ours, written into the SQL so that GROUP BY and SELECT share the expression
        s.execute(text(
            "INSERT INTO metric_rollups (series_id, block, n, vmin, vmax, vsum, step_min, step_max, last_value, last_ts)"
            " SELECT a.series_id, a.block, a.n, a.vmin, a.vmax, a.vsum, a.step_min, a.step_max, p.value, p.ts FROM ("
            f"  SELECT series_id, step / {r} AS block, COUNT(*) AS n, MIN(value) AS vmin, MAX(value) AS vmax,"
            "   SUM(value) AS vsum, MIN(step) AS step_min, MAX(step) AS step_max FROM metric_points"
            f"  WHERE series_id = :sid AND step >= :lo AND step < :hi GROUP BY series_id, step / {r}"
            " ) a JOIN metric_points p ON p.series_id = a.series_id AND p.step = a.step_max WHERE 1 = 1"
            " ON CONFLICT (series_id, block) DO UPDATE SET n = excluded.n, vmin = excluded.vmin,"
            " vmax = excluded.vmax, vsum = excluded.vsum, step_min = excluded.step_min,"
            " step_max = excluded.step_max, last_value = excluded.last_value, last_ts = excluded.last_ts"),
            {"sid": sid, "lo": (lo // r) * r, "hi": (hi // r + 1) * r})


def _copy_points(s: Session, rows: list[Point]) -> None:
    # New steps (the usual case) are COPYed straight into metric_points, inside a savepoint. A batch
    # that rewrites a stored step makes that COPY fail on the primary key; it is then rolled back and
    # the batch goes through a temporary table (living as long as the pooled connection, emptied at
    # each commit) and one INSERT ... SELECT ... ON CONFLICT. The rows travel as one text block:
    # formatting them here is faster than psycopg's per-row write_row.
    import psycopg

    stamps: dict[datetime, str] = {}  # a step's metrics share one timestamp: format it once
    block = "".join(f"{sid}\t{step}\t{value!r}\t"
                    f"{stamps.get(ts) or stamps.setdefault(ts, _naive_utc(ts).isoformat(' '))}\n"
                    for sid, step, value, ts in rows)
    cursor = s.connection().connection.driver_connection.cursor()
    cursor.execute("SAVEPOINT metric_points_copy")
    try:
        with cursor.copy("COPY metric_points (series_id, step, value, ts) FROM STDIN") as copy:
            copy.write(block)
        cursor.execute("RELEASE SAVEPOINT metric_points_copy")
        return
    except psycopg.errors.UniqueViolation:
        cursor.execute("ROLLBACK TO SAVEPOINT metric_points_copy")
    cursor.execute("CREATE TEMP TABLE IF NOT EXISTS metric_points_in (series_id integer, step bigint, "
                   "value double precision, ts timestamp) ON COMMIT DELETE ROWS")
    with cursor.copy("COPY metric_points_in (series_id, step, value, ts) FROM STDIN") as copy:
        copy.write(block)
    cursor.execute("INSERT INTO metric_points (series_id, step, value, ts) SELECT series_id, step, value, ts "
                   "FROM metric_points_in ON CONFLICT (series_id, step) DO UPDATE "
                   "SET value = EXCLUDED.value, ts = EXCLUDED.ts")
    cursor.execute("TRUNCATE metric_points_in")


def write_metrics(s: Session, run_id: str, points: Iterable[tuple[str, int, float, datetime]]) -> int:
    """(name, step, value, timestamp) points of one run."""
    points = list(points)
    ids = series_ids(s, run_id, {p[0] for p in points})
    return insert_points(s, [(ids[name], step, value, ts) for name, step, value, ts in points])


def _range_filter(step_from: int | None = None, step_to: int | None = None, time_from: datetime | None = None,
                  time_to: datetime | None = None) -> tuple[str, dict[str, Any]]:
    where, params = "", {}
    if step_from is not None:
        where += " AND step >= :step_from"
        params["step_from"] = step_from
    if step_to is not None:
        where += " AND step <= :step_to"
        params["step_to"] = step_to
    if time_from is not None:
        where += " AND ts >= :time_from"
        params["time_from"] = _naive_utc(time_from)
    if time_to is not None:
        where += " AND ts < :time_to"
        params["time_to"] = _naive_utc(time_to)
    return where, params


def _sql(statement: str, params: dict[str, Any]) -> Any:
    """A text query whose time bounds are bound as UTCDateTime (so SQLite compares the stored format)."""
    clause = text(statement)
    times = [bindparam(k, type_=UTCDateTime()) for k in ("time_from", "time_to") if k in params]
    return clause.bindparams(*times) if times else clause


def _ts(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite returns text from raw SQL
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def query_series(s: Session, series_id: int, *, max_points: int, step_from: int | None = None,
                 step_to: int | None = None, time_from: datetime | None = None,
                 time_to: datetime | None = None) -> dict[str, Any]:
    """Points of one series in a range: raw when the range holds at most `max_points` steps, else
    `max_points` or fewer equal-width step buckets with min/max/mean/count/last computed by the database."""
    where, params = _range_filter(step_from, step_to, time_from, time_to)
    params["sid"] = series_id
    lo, hi = s.execute(_sql(f"SELECT MIN(step), MAX(step) FROM metric_points WHERE series_id = :sid{where}",
                            params), params).one()
    if lo is None:
        return {"downsampled": False, "bucket_steps": 1, "points": []}
    width = max(1, math.ceil((hi - lo + 1) / max_points))
    # Steps are unique per series, so a width of 1 means at most max_points rows: send them as they are.
    params |= {"lo": lo, "hi": hi}
    if width == 1:
        rows = s.execute(_sql(f"SELECT step, value, ts FROM metric_points WHERE series_id = :sid "
                              f"AND step >= :lo AND step <= :hi{where} ORDER BY step", params), params).all()
        return {"downsampled": False, "bucket_steps": 1,
                "points": [{"step": st, "value": v, "timestamp": _ts(t)} for st, v, t in rows]}
    if width >= ROLLUP_STEPS and time_from is None and time_to is None:
        from_blocks = _downsample_blocks(s, series_id, lo, hi, max_points)
        if from_blocks is not None:
            return from_blocks
    params["width"] = width
    rows = s.execute(_sql(
        "SELECT b.step_min, b.step_max, b.n, b.vmin, b.vmax, b.vmean, p.value, p.ts FROM ("
        " SELECT (step - :lo) / CAST(:width AS BIGINT) AS bucket, MIN(step) AS step_min, MAX(step) AS step_max,"
        " COUNT(*) AS n, MIN(value) AS vmin, MAX(value) AS vmax, AVG(value) AS vmean"
        f" FROM metric_points WHERE series_id = :sid AND step >= :lo AND step <= :hi{where} GROUP BY 1"
        ") b JOIN metric_points p ON p.series_id = :sid AND p.step = b.step_max ORDER BY b.bucket", params), params).all()
    return {"downsampled": True, "bucket_steps": width, "points": [
        {"step": smax, "value": last, "timestamp": _ts(ts), "step_min": smin, "count": n, "min": vmin,
         "max": vmax, "mean": float(vmean)}
        for smin, smax, n, vmin, vmax, vmean, last, ts in rows]}


def _downsample_blocks(s: Session, series_id: int, lo: int, hi: int, max_points: int) -> dict[str, Any] | None:
    """Buckets that start on rollup-block boundaries: the whole blocks inside [lo, hi] summed from
    metric_rollups, a block that the range cuts at either end summed from its points (at most
    ROLLUP_STEPS of them), each in SQL; the (at most two) partial sums are then merged into their
    buckets. None when the series has no rollups for its end blocks (then the points are used)."""
    r = ROLLUP_STEPS
    first, last = lo // r, hi // r
    ends = dict(((blk, (smin, smax)) for blk, smin, smax in s.execute(text(
        "SELECT block, step_min, step_max FROM metric_rollups WHERE series_id = :sid AND block IN (:a, :b)"),
        {"sid": series_id, "a": first, "b": last}).all()))
    if set(ends) != {first, last}:
        return None
    per = max(1, math.ceil((last - first + 1) / max_points))  # blocks per bucket
    cut_first, cut_last = ends[first][0] < lo, ends[last][1] > hi
    buckets: dict[int, list[Any]] = {}  # bucket -> [step_min, step_max, n, vmin, vmax, vsum, last, ts]
    rows = s.execute(text(
        "SELECT b.bucket, b.step_min, b.step_max, b.n, b.vmin, b.vmax, b.vsum, x.last_value, x.last_ts FROM ("
        " SELECT (block - :first) / CAST(:per AS BIGINT) AS bucket, MIN(step_min) AS step_min,"
        " MAX(step_max) AS step_max, SUM(n) AS n, MIN(vmin) AS vmin, MAX(vmax) AS vmax, SUM(vsum) AS vsum"
        " FROM metric_rollups WHERE series_id = :sid AND block >= :lo_block AND block <= :hi_block GROUP BY 1"
        f") b JOIN metric_rollups x ON x.series_id = :sid AND x.block = b.step_max / {r}"),
        {"sid": series_id, "first": first, "per": per, "lo_block": first + cut_first,
         "hi_block": last - cut_last}).all()
    for bucket, *agg in rows:
        buckets[bucket] = list(agg)
    for block, cut, start, stop in ((first, cut_first, lo, first * r + r - 1), (last, cut_last, last * r, hi)):
        if not cut:
            continue
        part = s.execute(text(
            "SELECT a.step_min, a.step_max, a.n, a.vmin, a.vmax, a.vsum, p.value, p.ts FROM ("
            " SELECT MIN(step) AS step_min, MAX(step) AS step_max, COUNT(*) AS n, MIN(value) AS vmin,"
            " MAX(value) AS vmax, SUM(value) AS vsum FROM metric_points"
            " WHERE series_id = :sid AND step >= :start AND step <= :stop"
            ") a JOIN metric_points p ON p.series_id = :sid AND p.step = a.step_max"),
            {"sid": series_id, "start": start, "stop": stop}).first()
        if part is None:
            continue
        bucket = (block - first) // per
        have = buckets.get(bucket)
        if have is None:
            buckets[bucket] = list(part)
            continue
        later = part if part[1] > have[1] else have
        buckets[bucket] = [min(have[0], part[0]), max(have[1], part[1]), have[2] + part[2], min(have[3], part[3]),
                           max(have[4], part[4]), have[5] + part[5], later[6], later[7]]
    return {"downsampled": True, "bucket_steps": per * r, "points": [
        {"step": smax, "value": lv, "timestamp": _ts(ts), "step_min": smin, "count": int(n), "min": vmin,
         "max": vmax, "mean": float(vsum) / int(n)}
        for _, (smin, smax, n, vmin, vmax, vsum, lv, ts) in sorted(buckets.items())]}


def aggregate_series(s: Session, series_ids_: Sequence[int], **rng: Any) -> dict[int, dict[str, Any]]:
    """count/min/max/mean/first_step/last_step/last of each series in a range, in one query (over the
    rollup blocks when the whole series is asked for)."""
    if not series_ids_:
        return {}
    where, params = _range_filter(**rng)
    ids = ", ".join(str(int(i)) for i in series_ids_)  # ints from our own table, never client text
    if not params:
        rows = s.execute(text(
            "SELECT a.series_id, a.n, a.vmin, a.vmax, a.vmean, a.first_step, a.last_step, x.last_value FROM ("
            " SELECT series_id, SUM(n) AS n, MIN(vmin) AS vmin, MAX(vmax) AS vmax, SUM(vsum) / SUM(n) AS vmean,"
            f" MIN(step_min) AS first_step, MAX(step_max) AS last_step FROM metric_rollups WHERE series_id IN ({ids})"
            f" GROUP BY series_id) a JOIN metric_rollups x ON x.series_id = a.series_id"
            f" AND x.block = a.last_step / {ROLLUP_STEPS}")).all()
        return {sid: {"count": int(n), "min": vmin, "max": vmax, "mean": float(vmean), "first_step": first,
                      "last_step": last_step, "last": last}
                for sid, n, vmin, vmax, vmean, first, last_step, last in rows}
    rows = s.execute(_sql(
        "SELECT a.series_id, a.n, a.vmin, a.vmax, a.vmean, a.first_step, a.last_step, p.value FROM ("
        " SELECT series_id, COUNT(*) AS n, MIN(value) AS vmin, MAX(value) AS vmax, AVG(value) AS vmean,"
        " MIN(step) AS first_step, MAX(step) AS last_step"
        f" FROM metric_points WHERE series_id IN ({ids}){where} GROUP BY series_id"
        ") a JOIN metric_points p ON p.series_id = a.series_id AND p.step = a.last_step", params), params).all()
    return {sid: {"count": n, "min": vmin, "max": vmax, "mean": float(vmean), "first_step": first,
                  "last_step": last_step, "last": last}
            for sid, n, vmin, vmax, vmean, first, last_step, last in rows}


# ---- the training job's side (app.jobs.reporter) ----------------------------------------------------

def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def record_job_metrics(s: Session, *, job_id: str, step: int, metrics: dict[str, Any]) -> int:
    """Write one step's metrics of a job into the series of every running run linked to it."""
    run_ids = s.execute(select(Run.id).where(Run.job_id == job_id, Run.status == "running")).scalars().all()
    values = _numeric(metrics)
    now = utcnow()
    return sum(write_metrics(s, rid, [(k, step, v, now) for k, v in values.items()]) for rid in run_ids)


def record_job_end(s: Session, *, job_id: str, job_status: str, error: str | None,
                   final_metrics: dict[str, Any]) -> None:
    """End the running runs linked to a job that ended: completed with its final metrics, or failed.
    A paused job leaves its runs running (it resumes)."""
    if job_status not in ("completed", "failed", "cancelled"):
        return
    runs = s.execute(select(Run).where(Run.job_id == job_id, Run.status == "running")).scalars().all()
    for run in runs:
        run.final_metrics = {**run.final_metrics, **_numeric(final_metrics)}
        run.finished_at = utcnow()
        if job_status == "completed":
            run.status = "completed"
        else:
            run.status = "failed"
            run.error_message = error or f"training job {job_id} was {job_status}"
        s.add(run)
