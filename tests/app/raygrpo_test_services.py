"""Real PostgreSQL and Redis for the job API tests (imported by conftest.py and by module fixtures).

Without a server the tests skip, and under CI (CI=true) they fail instead, so CI never passes by skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from app.data.db import dispose_engine

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def unavailable(what: str, error: Exception) -> None:
    message = f"{what} unavailable: {error.__class__.__name__}: {error}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: services must run)")
    pytest.skip(message)


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """A new, empty PostgreSQL database; dropped afterwards even if connections remain."""
    server = make_url(os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL)
    if server.get_backend_name() != "postgresql":
        unavailable("PostgreSQL", ValueError(f"DATABASE_URL is not PostgreSQL: {server.drivername}"))
    # CREATE/DROP DATABASE cannot run inside a transaction
    admin = create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool,
                          connect_args={"connect_timeout": 3})
    name = f"raygrpo_t_{uuid.uuid4().hex[:16]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # any connection failure means: no server here
        admin.dispose()
        unavailable("PostgreSQL", e)
    url = server.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        dispose_engine(url)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()




def bearer(settings, subject: str = "alice", role: str = "admin", **kw) -> dict[str, str]:
    """Headers with a JWT the API built from `settings` accepts (signed with its secret)."""
    from app.api.auth import mint_token

    return {"Authorization": f"Bearer {mint_token(settings, subject, role, **kw)}"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_stack(home, model_dir: str, **env: str) -> Iterator[str]:
    """The job API on Ray Serve in the test session's Ray (SQLite under `home`, no Redis, no job started
    unless RAYGRPO_MAX_RUNNING_JOBS says so); yields its URL; Serve and the dispatcher go after."""
    import time

    import ray
    from ray import serve

    from app.api.serve import start
    from app.jobs.dispatcher import ACTOR_NAME, NAMESPACE

    env = {"RAYGRPO_HOME": str(home), "DATABASE_URL": f"sqlite:///{home / 'raygrpo.db'}", "REDIS_URL": "",
           "RAYGRPO_DEFAULT_MODEL": model_dir, "RAYGRPO_MAX_RUNNING_JOBS": "0", **env}
    yield start(port=free_port(), env=env)
    stop_ray_jobs()
    serve.shutdown()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            ray.kill(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE))
        except ValueError:
            break
        time.sleep(0.5)


def stop_ray_jobs(timeout_s: float = 60.0) -> None:
    """Stop every Ray Job of the test session's cluster that is still going (a run a test left queued or
    running): the next module must find the cluster's CPUs free."""
    import time

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(os.environ["RAYGRPO_TEST_DASHBOARD_URL"])
    live = [j.submission_id for j in client.list_jobs() if j.submission_id and not j.status.is_terminal()]
    for sid in live:
        client.stop_job(sid)
    deadline = time.time() + timeout_s
    while live and time.time() < deadline:
        live = [sid for sid in live if not client.get_job_status(sid).is_terminal()]
        time.sleep(0.5)
