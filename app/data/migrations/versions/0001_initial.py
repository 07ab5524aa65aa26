"""initial: training_jobs, trajectories, policy_checkpoints, as app/data/tables.py declares them

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Plain SQLAlchemy types only, so this file never changes when app/data/tables.py does: `UTCDateTime` is a
naive UTC `DateTime` in the database, sqlmodel's `AutoString(n)` a `VARCHAR(n)`. Money is NUMERIC(14, 6).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("agent_id", sa.String(length=256), nullable=False),
        sa.Column("owner", sa.String(length=256), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=256), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("engine_config", sa.JSON(), nullable=False),
        sa.Column("training_rows", sa.Integer(), nullable=False),
        sa.Column("evaluation_rows", sa.Integer(), nullable=False),
        sa.Column("total_iterations", sa.Integer(), nullable=False),
        sa.Column("current_iteration", sa.Integer(), nullable=False),
        sa.Column("trajectories_generated", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("budget_usd", sa.Numeric(precision=14, scale=6), nullable=True),
        sa.Column("cost_usd", sa.Numeric(precision=14, scale=6), server_default="0", nullable=False),
        sa.Column("budget_warned_pct", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("stop_reason", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("best_checkpoint_id", sa.String(length=64), nullable=True),
        sa.Column("ray_submission_id", sa.String(length=128), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key", name="uq_training_jobs_idempotency_key"),
    )
    op.create_index("ix_training_jobs_agent_id", "training_jobs", ["agent_id"])
    op.create_index("ix_training_jobs_owner", "training_jobs", ["owner"])
    op.create_index("ix_training_jobs_status", "training_jobs", ["status"])
    op.create_index("ix_training_jobs_created_at", "training_jobs", ["created_at"])
    op.create_index("ix_training_jobs_agent_created", "training_jobs", ["agent_id", "created_at"])
    op.create_index("ix_training_jobs_status_priority", "training_jobs", ["status", "priority", "created_at"])

    op.create_table(
        "policy_checkpoints",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("eval_reward", sa.Float(), nullable=True),
        sa.Column("is_best", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["training_jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_policy_checkpoints_job_step", "policy_checkpoints", ["job_id", "step"])

    op.create_table(
        "trajectories",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("completion", sa.Text(), nullable=False),
        sa.Column("expected", sa.Text(), nullable=True),
        sa.Column("reward", sa.Float(), nullable=False),
        sa.Column("advantage", sa.Float(), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("finish_reason", sa.String(length=16), nullable=True),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["training_jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_trajectories_job_step", "trajectories", ["job_id", "step"])
    op.create_index("ix_trajectories_job_reward", "trajectories", ["job_id", "reward"])


def downgrade() -> None:
    op.drop_index("ix_trajectories_job_reward", table_name="trajectories")
    op.drop_index("ix_trajectories_job_step", table_name="trajectories")
    op.drop_table("trajectories")
    op.drop_index("ix_policy_checkpoints_job_step", table_name="policy_checkpoints")
    op.drop_table("policy_checkpoints")
    for name in ("status_priority", "agent_created", "created_at", "status", "owner", "agent_id"):
        op.drop_index(f"ix_training_jobs_{name}", table_name="training_jobs")
    op.drop_table("training_jobs")
