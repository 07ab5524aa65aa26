"""Engines, sessions and the data-access functions of the job API.

Every function takes the caller's `Session` and keyword-only arguments, changes rows and returns them;
the caller's `session_scope` commits. Policy (who may cancel, what a budget allows, which transition is
legal for a request) lives in the handlers and the dispatcher, not here. What this module does guarantee
is atomicity where concurrent writers meet: one job per idempotency key, one claimer per queued job,
the first final state wins. Those are conditional UPDATEs or row locks, never read-then-write in Python.

Not covered: the Redis queue (app's queue module) and schema changes in production (Alembic,
`python -m app.data.db upgrade`).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, create_engine, event, func, insert, or_, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel, col, select

from app.data.tables import JobStatus, PolicyCheckpoint, TrainingJob, Trajectory, utcnow

FINAL_STATES = [s.value for s in JobStatus if s.is_final]
SUCCESS_REWARD = 1.0 - 1e-9
"""a trajectory counts as a success at full reward (rewards are in [0, 1]), unless the row says otherwise"""
SQLITE_BUSY_TIMEOUT_MS = 30_000
CLAIM_RETRIES = 50


class NotFoundError(LookupError):
    """The named row does not exist; the message names the field."""


# ---------------------------------------------------------------------------------------------- engines

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _normalize_url(url: str) -> str:
    return "postgresql://" + url.removeprefix("postgres://") if url.startswith("postgres://") else url


def get_engine(url: str) -> Engine:
    """One engine (and pool) per URL per process; Serve replicas and the run's reporter each have theirs."""
    url = _normalize_url(url)
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = _create_engine(url)
        return engine


def dispose_engine(url: str) -> None:
    """Close the pool of `url` and forget it (tests drop their database after this)."""
    with _engines_lock:
        engine = _engines.pop(_normalize_url(url), None)
    if engine is not None:
        engine.dispose()


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # pre_ping: Serve replicas live for days and PostgreSQL restarts under them.
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_recycle=1800)

    memory = parsed.database in (None, "", ":memory:")
    if not memory:
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        **({"poolclass": StaticPool} if memory else {}),
    )
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "savepoint", _sqlite_begin_before_savepoint)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Several threads and processes write one file (Serve replicas, the run's reporter): WAL lets readers
    # go on during a write, busy_timeout makes writers wait for the lock instead of failing at once.
    # The sqlite3 module runs reads outside a transaction and opens one before the first write; IMMEDIATE
    # takes the write lock right there (waiting up to busy_timeout). A DEFERRED one would take a read
    # snapshot first and fail with "database is locked", without waiting, if another writer got in.
    dbapi_connection.isolation_level = "IMMEDIATE"
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin_before_savepoint(conn: Any, name: str) -> None:
    # A SAVEPOINT outside a transaction would open one that its RELEASE commits, so the caller's later
    # rollback could not undo it (the sqlite3 module does not BEGIN before a SAVEPOINT). Open it first.
    dbapi_connection = conn.connection.dbapi_connection
    if not dbapi_connection.in_transaction:
        dbapi_connection.execute("BEGIN IMMEDIATE")


def init_db(engine: Engine | Connection) -> None:
    """Create missing tables (tests, and a new embedded SQLite file: `prepare_embedded`); production runs
    Alembic."""
    import app.data.tables  # noqa: F401  (registers the tables on SQLModel.metadata)

    SQLModel.metadata.create_all(engine)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises.

    Objects stay readable after the block (`expire_on_commit=False`): handlers return them.
    """
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


# ---------------------------------------------------------------------------------------------- jobs


def create_job(
    session: Session,
    *,
    agent_id: str,
    owner: str | None,
    config: dict[str, Any],
    engine_config: dict[str, Any],
    total_iterations: int,
    budget_usd: Decimal | None,
    priority: int,
    idempotency_key: str | None,
    training_rows: int,
    evaluation_rows: int,
) -> tuple[TrainingJob, bool]:
    """Insert a queued job; with an idempotency key already used, return that job and created=False.

    The unique constraint decides under concurrency: the loser's INSERT fails inside a SAVEPOINT, which
    is rolled back alone, and the winner's row is read back.
    """
    if idempotency_key is not None and (existing := _job_by_key(session, idempotency_key)) is not None:
        return existing, False
    job = TrainingJob(
        agent_id=agent_id, owner=owner, config=config, engine_config=engine_config,
        total_iterations=total_iterations, budget_usd=budget_usd, priority=priority,
        idempotency_key=idempotency_key, training_rows=training_rows, evaluation_rows=evaluation_rows,
    )
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        existing = _job_by_key(session, idempotency_key) if idempotency_key is not None else None
        if existing is None:
            raise
        return existing, False
    return job, True


def _job_by_key(session: Session, key: str) -> TrainingJob | None:
    return session.exec(select(TrainingJob).where(TrainingJob.idempotency_key == key)).first()


def get_job(session: Session, *, job_id: str) -> TrainingJob | None:
    return session.get(TrainingJob, job_id)


def _require_job(session: Session, job_id: str) -> TrainingJob:
    # populate_existing: the row was just changed by a Core UPDATE; the identity map may hold the old one.
    job = session.get(TrainingJob, job_id, populate_existing=True)
    if job is None:
        raise NotFoundError(f"job_id: no job {job_id!r}")
    return job


def _encode_cursor(job: TrainingJob) -> str:
    raw = json.dumps({"created_at": job.created_at.isoformat(), "id": job.id}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        created_at, job_id = datetime.fromisoformat(data["created_at"]), data["id"]
    except (binascii.Error, ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"cursor: not a cursor this API returned ({e.__class__.__name__})") from None
    if not isinstance(job_id, str):
        raise ValueError("cursor: not a cursor this API returned (id)")
    return (created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC)), job_id


def list_jobs(
    session: Session,
    *,
    agent_id: str | None = None,
    status: str | None = None,
    owner: str | None = None,
    limit: int = 20,
    cursor: str | None = None,
) -> tuple[list[TrainingJob], str | None]:
    """Newest first; returns the page and the cursor of the next page (None on the last one).

    Keyset pagination on (created_at, id): a page never repeats or skips a job when jobs are added.
    """
    if limit < 1:
        raise ValueError(f"limit: must be at least 1, got {limit}")
    query = select(TrainingJob)
    if agent_id is not None:
        query = query.where(TrainingJob.agent_id == agent_id)
    if status is not None:
        query = query.where(TrainingJob.status == str(status))
    if owner is not None:
        query = query.where(TrainingJob.owner == owner)
    if cursor is not None:
        created_at, job_id = _decode_cursor(cursor)
        query = query.where(or_(
            col(TrainingJob.created_at) < created_at,
            and_(col(TrainingJob.created_at) == created_at, col(TrainingJob.id) < job_id),
        ))
    query = query.order_by(col(TrainingJob.created_at).desc(), col(TrainingJob.id).desc()).limit(limit + 1)
    rows = list(session.exec(query))
    page = rows[:limit]
    return page, (_encode_cursor(page[-1]) if len(rows) > limit else None)


def claim_next_job(session: Session) -> TrainingJob | None:
    """Move the next queued job (highest priority, then oldest) to running and return it; None if none.

    The database as the queue when there is no Redis. PostgreSQL locks the row with SKIP LOCKED, so
    concurrent claimers each take a different row without waiting. SQLite has no row locks: the UPDATE is
    conditional on the row still being queued, and a claimer that lost the race tries the next job.
    """
    order = (col(TrainingJob.priority).desc(), col(TrainingJob.created_at), col(TrainingJob.id))
    queued = select(TrainingJob.id).where(TrainingJob.status == JobStatus.queued).order_by(*order).limit(1)
    if session.get_bind().dialect.name == "postgresql":
        job_id = session.exec(queued.with_for_update(skip_locked=True)).first()
        return None if job_id is None else _start(session, job_id)
    for _ in range(CLAIM_RETRIES):
        job_id = session.exec(queued).first()
        if job_id is None:
            return None
        if (job := _start(session, job_id)) is not None:
            return job
    return None


def _start(session: Session, job_id: str, **fields: Any) -> TrainingJob | None:
    """queued -> running (started_at, attempts+1) if the job is still queued; None otherwise."""
    now = utcnow()
    result = session.execute(
        update(TrainingJob)
        .where(col(TrainingJob.id) == job_id, col(TrainingJob.status) == JobStatus.queued)
        .values(status=JobStatus.running, started_at=now, updated_at=now,
                attempts=TrainingJob.attempts + 1, **fields)
        .execution_options(synchronize_session=False)
    )
    return _require_job(session, job_id) if result.rowcount == 1 else None


def mark_running(session: Session, *, job_id: str, ray_submission_id: str) -> TrainingJob | None:
    """queued -> running when Redis is the queue; None if the job is not (or no longer) queued."""
    return _start(session, job_id, ray_submission_id=ray_submission_id)


def _finite(value: Any) -> Any:
    """NaN and inf become None, at any depth: JSON columns (PostgreSQL's above all) reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def record_progress(
    session: Session, *, job_id: str, step: int, metrics: dict[str, Any], cost_usd: Decimal
) -> TrainingJob:
    """The latest step's metrics and the cost so far; current_iteration never goes backwards."""
    result = session.execute(
        update(TrainingJob)
        .where(col(TrainingJob.id) == job_id)
        .values(
            # max() in SQL, so a late report from an older step cannot move the counter back
            current_iteration=case(
                (col(TrainingJob.current_iteration) < step, step), else_=col(TrainingJob.current_iteration)
            ),
            metrics=_finite(metrics),
            cost_usd=cost_usd,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        raise NotFoundError(f"job_id: no job {job_id!r}")
    return _require_job(session, job_id)


def finish_job(
    session: Session,
    *,
    job_id: str,
    status: JobStatus,
    error_message: str | None = None,
    stop_reason: str | None = None,
) -> TrainingJob:
    """Move a job to a final state. The first final state wins: a job already final is returned as is."""
    status = JobStatus(status)
    if not status.is_final:
        raise ValueError(f"status: {status.value!r} is not a final state ({', '.join(FINAL_STATES)})")
    now = utcnow()
    fields: dict[str, Any] = {"status": status, "finished_at": now, "updated_at": now}
    if status is JobStatus.cancelled:
        fields["cancelled_at"] = now
    if error_message is not None:
        fields["error_message"] = error_message
    if stop_reason is not None:
        fields["stop_reason"] = stop_reason
    session.execute(
        update(TrainingJob)
        .where(col(TrainingJob.id) == job_id, col(TrainingJob.status).not_in(FINAL_STATES))
        .values(**fields)
        .execution_options(synchronize_session=False)
    )
    return _require_job(session, job_id)


def request_cancel(session: Session, *, job_id: str, reason: str | None) -> TrainingJob:
    """Flag a job for cancellation. A job with no run (queued, paused) is cancelled at once; a running
    job stays running until its run sees the flag and stops; a final job is returned unchanged."""
    stop_reason = reason or "cancelled"
    if len(stop_reason) > 64:  # the column's width; PostgreSQL would refuse it with a less clear error
        raise ValueError(f"reason: at most 64 characters, got {len(stop_reason)}")
    now = utcnow()
    cancelled_now = session.execute(
        update(TrainingJob)
        .where(col(TrainingJob.id) == job_id,
               col(TrainingJob.status).in_([JobStatus.queued, JobStatus.paused]))
        .values(status=JobStatus.cancelled, cancel_requested=True, stop_reason=stop_reason,
                cancelled_at=now, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if cancelled_now.rowcount == 0:
        session.execute(
            update(TrainingJob)
            .where(col(TrainingJob.id) == job_id, col(TrainingJob.status).not_in(FINAL_STATES))
            .values(cancel_requested=True, stop_reason=stop_reason, updated_at=now)
            .execution_options(synchronize_session=False)
        )
    return _require_job(session, job_id)


def set_status(
    session: Session,
    *,
    job_id: str,
    status: JobStatus | str,
    only_from: list[str] | None = None,
    **fields: Any,
) -> TrainingJob | None:
    """Set the status and any other columns (pause/resume: running -> paused, paused -> queued, ...).

    With `only_from`, the change happens only if the job is in one of those states (atomically);
    returns None when it is not, or when there is no such job.
    """
    status = JobStatus(status)
    columns = TrainingJob.model_fields
    for name in fields:
        if name not in columns or name in ("id", "status"):
            raise ValueError(f"{name}: not a settable column of TrainingJob")
    query = update(TrainingJob).where(col(TrainingJob.id) == job_id)
    if only_from is not None:
        query = query.where(col(TrainingJob.status).in_([str(s) for s in only_from]))
    result = session.execute(
        query.values(status=status, **{"updated_at": utcnow(), **fields})
        .execution_options(synchronize_session=False)
    )
    return _require_job(session, job_id) if result.rowcount == 1 else None


def jobs_in_states(session: Session, *, states: list[str]) -> list[TrainingJob]:
    """Jobs in any of `states`, oldest first (the dispatcher's reconcile after a restart)."""
    query = select(TrainingJob).where(col(TrainingJob.status).in_([str(s) for s in states]))
    return list(session.exec(query.order_by(col(TrainingJob.created_at), col(TrainingJob.id))))


# ---------------------------------------------------------------------------------------------- trajectories


def _text(value: str | None) -> str | None:
    """Model output may hold NUL characters, which PostgreSQL text cannot store: U+FFFD stands in."""
    return None if value is None else value.replace("\x00", "\ufffd")


def discard_steps_after(session: Session, *, job_id: str, step: int) -> int:
    """A run resumed after `step`: what an earlier attempt stored for later steps goes, so the re-run steps
    are stored once (their trajectories, and the counters that count them). Returns the rows deleted."""
    from sqlalchemy import delete

    gone = session.execute(
        delete(Trajectory).where(col(Trajectory.job_id) == job_id, col(Trajectory.step) > step)
    ).rowcount or 0
    session.execute(
        update(TrainingJob)
        .where(col(TrainingJob.id) == job_id)
        .values(trajectories_generated=func.max(TrainingJob.trajectories_generated - gone, 0)
                if session.get_bind().dialect.name == "sqlite"
                else func.greatest(TrainingJob.trajectories_generated - gone, 0),
                current_iteration=case((col(TrainingJob.current_iteration) > step, step),
                                       else_=col(TrainingJob.current_iteration)),
                updated_at=utcnow())
    )
    return gone


def add_trajectories(session: Session, *, job_id: str, rows: list[dict[str, Any]]) -> int:
    """Store one step's trajectories (rows as `grpo.trainer.trajectories` makes them); returns how many.

    One executemany INSERT, and the job's counter moves in the same transaction.
    """
    if not rows:
        return 0
    counted = session.execute(
        update(TrainingJob)
        .where(col(TrainingJob.id) == job_id)
        .values(trajectories_generated=TrainingJob.trajectories_generated + len(rows), updated_at=utcnow())
    )
    if counted.rowcount != 1:
        raise NotFoundError(f"job_id: no job {job_id!r}")
    now = utcnow()
    values = [
        {
            "job_id": job_id,
            "step": int(r["step"]),
            "query": _text(r["prompt"] if "prompt" in r else r["query"]),
            "completion": _text(r["completion"]),
            "expected": _text(r.get("expected")),
            "reward": float(r["reward"]),
            "advantage": float(r.get("advantage", 0.0)),
            "success": bool(r["success"]) if "success" in r else float(r["reward"]) >= SUCCESS_REWARD,
            "finish_reason": r.get("finish_reason"),
            "tokens": int(r.get("tokens", 0)),
            "policy_version": int(r.get("policy_version", 0)),
            "steps": _finite(r.get("steps")),
            "created_at": now,
        }
        for r in rows
    ]
    session.execute(insert(Trajectory.__table__), values)
    return len(values)


def export_trajectories(
    session: Session,
    *,
    job_id: str,
    success_only: bool,
    min_reward: float | None,
    limit: int,
    offset: int,
) -> tuple[list[Trajectory], int]:
    """A page of a job's trajectories in (step, id) order, and how many match the filters in all."""
    conditions = [col(Trajectory.job_id) == job_id]
    if success_only:
        conditions.append(col(Trajectory.success).is_(True))
    if min_reward is not None:
        conditions.append(col(Trajectory.reward) >= min_reward)
    total = session.exec(select(func.count()).select_from(Trajectory).where(*conditions)).one()
    page = session.exec(
        select(Trajectory).where(*conditions)
        .order_by(col(Trajectory.step), col(Trajectory.id)).limit(limit).offset(offset)
    )
    return list(page), int(total)


# ---------------------------------------------------------------------------------------------- checkpoints


def add_checkpoint(
    session: Session, *, job_id: str, step: int, path: str, eval_reward: float | None = None
) -> PolicyCheckpoint:
    checkpoint = PolicyCheckpoint(job_id=job_id, step=step, path=path, eval_reward=eval_reward)
    session.add(checkpoint)
    session.flush()
    return checkpoint


def set_best_checkpoint(session: Session, *, job_id: str, checkpoint_id: str) -> TrainingJob:
    """Mark one checkpoint of the job as the best (and no other); the job points at it."""
    checkpoint = session.get(PolicyCheckpoint, checkpoint_id)
    if checkpoint is None or checkpoint.job_id != job_id:
        raise NotFoundError(f"checkpoint_id: no checkpoint {checkpoint_id!r} of job {job_id!r}")
    session.execute(
        update(PolicyCheckpoint)
        .where(col(PolicyCheckpoint.job_id) == job_id)
        .values(is_best=col(PolicyCheckpoint.id) == checkpoint_id)
        .execution_options(synchronize_session="fetch")
    )
    session.execute(
        update(TrainingJob)
        .where(col(TrainingJob.id) == job_id)
        .values(best_checkpoint_id=checkpoint_id, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return _require_job(session, job_id)


def list_checkpoints(session: Session, *, job_id: str) -> list[PolicyCheckpoint]:
    query = select(PolicyCheckpoint).where(PolicyCheckpoint.job_id == job_id)
    return list(session.exec(query.order_by(col(PolicyCheckpoint.step), col(PolicyCheckpoint.created_at))))


def get_checkpoint(session: Session, *, checkpoint_id: str) -> PolicyCheckpoint | None:
    return session.get(PolicyCheckpoint, checkpoint_id)


# ---------------------------------------------------------------------------------------------- migrations


def alembic_config(url: str | None = None) -> Any:
    """The Alembic config of app/data/alembic.ini, pointed at `url` (else env.py uses the settings)."""
    from alembic.config import Config

    config = Config(str(Path(__file__).with_name("alembic.ini")))
    config.attributes["configure_logger"] = False
    if url is not None:
        config.set_main_option("sqlalchemy.url", _normalize_url(url).replace("%", "%%"))
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


# The last revision whose schema the embedded SQLite database was created at without an Alembic stamp
# (`create_all` alone): such a file is stamped with it, then upgraded like any other.
UNSTAMPED_SCHEMA = "0004"


def prepare_embedded(engine: Engine) -> str:
    """Bring the embedded SQLite database to the newest schema through Alembic, so `raygrpo db upgrade` and
    `alembic upgrade head` keep working on it: a new file gets the tables and the head stamp, a file with a
    stamp is upgraded, a file from before stamps existed is stamped at its schema and upgraded.
    Returns what was done: "created", "upgraded", "stamped" or "stamped-and-upgraded"."""
    from alembic import command
    from sqlalchemy import inspect

    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        tables = set(inspect(conn).get_table_names())
        if not tables - {"alembic_version"}:
            init_db(conn)
            command.stamp(config, "head")
            return "created"
        done = "upgraded"
        if "alembic_version" not in tables:
            # create_all without a stamp: by this code (every table and column it declares is there: head),
            # or by an older one (the schema of UNSTAMPED_SCHEMA, upgraded from there)
            inspector = inspect(conn)
            current = all({c.name for c in table.columns} <= {c["name"] for c in inspector.get_columns(name)}
                          for name, table in SQLModel.metadata.tables.items() if name in tables) \
                and set(SQLModel.metadata.tables) <= tables
            command.stamp(config, "head" if current else UNSTAMPED_SCHEMA)
            done = "stamped" if current else "stamped-and-upgraded"
        command.upgrade(config, "head")
        return done


def main(argv: list[str] | None = None) -> None:
    from app.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m app.data.db", description="database schema of the job API")
    parser.add_argument("command", choices=["upgrade"], help="upgrade: alembic upgrade head")
    parser.add_argument("--url", help="SQLAlchemy URL (default: DATABASE_URL or the SQLite file)")
    args = parser.parse_args(argv)
    url = args.url or Settings().db_url
    upgrade(url)
    print(f"upgraded {make_url(url).render_as_string(hide_password=True)} to head")


if __name__ == "__main__":
    main()
