"""The data layer: sqlmodel tables (`tables`), data-access functions (`db`), Alembic migrations
(`migrations`, `alembic.ini`) and the Redis fast path of the job queue (`queue`).

The database is the source of truth; Redis holds a fast copy of what waits. Functions here take a
session and keyword-only typed arguments and return rows; they know nothing of HTTP, auth or Ray.
Does not own: permission checks (the callers in app.api, app.jobs, app.research), settings parsing.
"""
