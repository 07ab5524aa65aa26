"""The one JSON-RPC method registry of the API, and the `Context` every handler receives.

Every capability package (the job system, serving, the research registry, the auth methods) registers its
methods on `registry`; `app.api.main` imports those packages, so a method exists once its module is imported.
`Context` is what a handler gets besides its params: settings, the database engine, the Redis fast path of
the queue, the rate limiter and the request counters. Not here: the handlers themselves, HTTP (app.api.main).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy.engine import Engine

from app.api.auth import authorize
from app.api.jsonrpc import Registry
from app.api.metrics import RequestCounters
from app.api.ratelimit import RateLimiter, rate_limit
from app.data import db
from app.data.queue import JobQueue, RedisQueue
from app.settings import Settings

registry = Registry(sync_in_thread=True)  # handlers open their own sessions
registry.add_guard(authorize)
registry.add_guard(rate_limit)


@dataclass
class Context:
    """What every handler gets besides its params."""

    settings: Settings
    engine: Engine
    queue: JobQueue | None  # Redis fast path; None: the database is the queue
    limiter: RateLimiter | None = None
    counters: RequestCounters | None = None

    @classmethod
    def open(cls, settings: Settings) -> Context:
        """The database (the embedded SQLite is created or upgraded through Alembic; PostgreSQL is upgraded
        by the operator), the queue, and the rate limiter and request counters (in Redis when there is one,
        shared by every replica)."""
        engine = db.get_engine(settings.db_url)
        if settings.db_url.startswith("sqlite"):
            settings.home.mkdir(parents=True, exist_ok=True)
            db.prepare_embedded(engine)
        return cls(settings=settings, engine=engine,
                   queue=RedisQueue(settings.redis_url) if settings.redis_url else None,
                   limiter=RateLimiter(settings.rate_limits, settings.redis_url),
                   counters=RequestCounters(settings.redis_url))


def money(value: Decimal | None) -> str | None:
    """Money on the wire: a decimal string with 6 places (never a float)."""
    return None if value is None else f"{Decimal(value).quantize(Decimal('0.000001'))}"
