"""tenant isolation: deployments an admin shares; which dataset received which upload

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("policy_deployments") as batch:
        batch.add_column(sa.Column("shared", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "dataset_uploads",
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("uploaded_by", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"]),
        sa.PrimaryKeyConstraint("dataset_id", "content_hash"),
    )


def downgrade() -> None:
    op.drop_table("dataset_uploads")
    with op.batch_alter_table("policy_deployments") as batch:
        batch.drop_column("shared")
