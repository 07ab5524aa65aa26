"""Fixtures of the job API tests: a fresh database per test, on SQLite and on PostgreSQL, and Redis.

`db_url` is a new SQLite file, or a new PostgreSQL database (`raygrpo_t_<uuid>`, dropped after the
test) on the server of DATABASE_URL. The PostgreSQL and Redis params are marked `services`: without
the server they skip, and under CI (CI=true) they fail instead, so CI never passes by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from raygrpo_test_services import DEFAULT_REDIS_URL, fresh_postgres, unavailable
from sqlalchemy import Engine
from sqlmodel import Session

from app.data.db import dispose_engine, get_engine, init_db


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test."""
    with fresh_postgres() as url:
        yield url


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
