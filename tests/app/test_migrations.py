"""Alembic: `upgrade head` on an empty database builds exactly what app/data/tables.py declares (autogenerate
finds nothing to add), on SQLite and PostgreSQL; `downgrade base` removes it again."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel

from app.data import db

TABLES = {"dataset_uploads", "training_jobs", "trajectories", "policy_checkpoints", "api_keys", "audit_log", "policy_deployments",
          "experiments", "runs", "metric_series", "metric_points", "metric_rollups", "registered_models", "datasets",
          "dataset_versions", "prompt_templates", "prompt_template_versions", "evaluations", "registry_members", "training_sessions",
          "registry_tags"}
ROOT = Path(__file__).resolve().parents[2]


def test_upgrade_matches_models_and_downgrade_drops(db_url):
    command.upgrade(db.alembic_config(db_url), "head")
    engine = create_engine(db_url, poolclass=NullPool)
    try:
        inspector = inspect(engine)
        assert TABLES | {"alembic_version"} == set(inspector.get_table_names())
        indexes = {i["name"] for i in inspector.get_indexes("training_jobs")}
        assert {"ix_training_jobs_status_priority", "ix_training_jobs_agent_created"} <= indexes
        uniques = {u["name"] for u in inspector.get_unique_constraints("training_jobs")}
        assert "uq_training_jobs_idempotency_key" in uniques
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, SQLModel.metadata) == []

        # the migrated schema serves the data-access functions (money as NUMERIC, JSON columns)
        with db.session_scope(db.get_engine(db_url)) as s:
            job, _ = db.create_job(
                s, agent_id="a", owner=None, config={"x": [1]}, engine_config={}, total_iterations=1,
                budget_usd=Decimal("1.234567"), priority=0, idempotency_key="k", training_rows=0,
                evaluation_rows=0,
            )
        db.dispose_engine(db_url)
        with db.session_scope(db.get_engine(db_url)) as s:
            got = db.get_job(s, job_id=job.id)
            assert got.budget_usd == Decimal("1.234567") and got.config == {"x": [1]}
        db.dispose_engine(db_url)

        command.downgrade(db.alembic_config(db_url), "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()


def test_cli_upgrade_and_alembic_command_line(db_url):
    """`python -m app.data.db upgrade --url` and `alembic -c app/data/alembic.ini -x url=` both reach head."""
    run = [sys.executable, "-m", "app.data.db", "upgrade", "--url", db_url]
    subprocess.run(run, cwd=ROOT, check=True, capture_output=True)
    alembic = [sys.executable, "-m", "alembic", "-c", "app/data/alembic.ini", "-x", f"url={db_url}"]
    current = subprocess.run([*alembic, "current"], cwd=ROOT, check=True, capture_output=True, text=True)
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(db.alembic_config(db_url)).get_current_head()
    assert f"{head} (head)" in current.stdout
    subprocess.run([*alembic, "check"], cwd=ROOT, check=True, capture_output=True)


def _revision(url: str) -> str | None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def test_the_embedded_sqlite_file_is_kept_at_head_through_alembic(tmp_path):
    """A new file is created and stamped; a file this code made with create_all alone (tests, the API before
    stamping) is stamped at head; a file an older version made at revision 0004 without a stamp is stamped
    there and upgraded. Each then answers `alembic upgrade head` with nothing to do."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(db.alembic_config()).get_current_head()

    def prepared(path: Path, setup=None) -> str:
        url = f"sqlite:///{path}"
        engine = db.get_engine(url)
        if setup is not None:
            setup(url, engine)
        done = db.prepare_embedded(engine)
        db.dispose_engine(url)
        assert _revision(url) == head
        db.upgrade(url)  # nothing left to do, and no error
        return done

    assert prepared(tmp_path / "new.db") == "created"
    assert prepared(tmp_path / "again.db", lambda url, engine: db.prepare_embedded(engine)) == "upgraded"
    assert prepared(tmp_path / "current.db", lambda url, engine: db.init_db(engine)) == "stamped"

    def old_version(url: str, engine) -> None:
        db.upgrade(url, "0004")
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE alembic_version")

    assert prepared(tmp_path / "old.db", old_version) == "stamped-and-upgraded"
    columns = {c["name"] for c in inspect(create_engine(f"sqlite:///{tmp_path / 'old.db'}")).get_columns("training_jobs")}
    assert "job_id" in columns
