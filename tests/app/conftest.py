"""Fixtures of the job API tests: a fresh database per test, on SQLite and on PostgreSQL, and Redis.

`db_url` is a new SQLite file, or a new PostgreSQL database (`raygrpo_t_<uuid>`, dropped after the
test) on the server of DATABASE_URL. The PostgreSQL and Redis params are marked `services`: without
the server they skip, and under CI (CI=true) they fail instead, so CI never passes by skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from sqlmodel import Session

from app.db import dispose_engine, get_engine, init_db

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def unavailable(what: str, error: Exception) -> None:
    message = f"{what} unavailable: {error.__class__.__name__}: {error}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: services must run)")
    pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test; dropped afterwards even if connections remain."""
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


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def db_url(request, tmp_path) -> Iterator[str]:
    """A URL of an empty database of its own, on each backend."""
    if request.param == "postgresql":
        yield request.getfixturevalue("postgres_url")
        return
    url = f"sqlite:///{tmp_path / 'raygrpo.db'}"
    yield url
    dispose_engine(url)


@pytest.fixture
def engine(db_url) -> Iterator[Engine]:
    engine = get_engine(db_url)
    init_db(engine)
    yield engine
    dispose_engine(db_url)


@pytest.fixture
def session(engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.services)])
def redis_url() -> str:
    """REDIS_URL (or the local default) once it answers PING. The server is shared: use unique keys."""
    import redis

    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except Exception as e:  # any connection failure means: no server here
        unavailable("Redis", e)
    finally:
        client.close()
    return url
