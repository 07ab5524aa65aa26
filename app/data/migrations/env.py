"""Alembic environment of the job API: the URL and the metadata the migrations run against.

URL, first found: `-x url=...`, the config's sqlalchemy.url (set by `app.data.db.upgrade` or a test), then
`app.settings.get_settings().db_url`. A caller may also hand over an open connection in
`config.attributes["connection"]`.
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from sqlalchemy import create_engine, event
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

from app.data.db import _sqlite_on_connect
from app.data.tables import UTCDateTime  # importing app.data.tables registers the tables on SQLModel.metadata

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = SQLModel.metadata


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from app.settings import get_settings

    return get_settings().db_url


def render_item(type_: str, obj: object, autogen_context: object) -> str | Literal[False]:
    """New migrations name plain SQLAlchemy types, never app code that may change or move."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime()"
    if type_ == "type" and isinstance(obj, AutoString):
        return f"sa.String(length={obj.length})" if obj.length else "sa.String()"
    return False


def configure(**kwargs: Any) -> None:
    # batch mode: SQLite cannot ALTER most things, so later migrations copy-and-move its tables
    context.configure(target_metadata=target_metadata, compare_type=True, render_as_batch=True,
                      render_item=render_item, **kwargs)


def run_migrations_offline() -> None:
    configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = database_url()
    engine = create_engine(url, poolclass=NullPool)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
    try:
        with engine.connect() as connection:
            configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
