"""policy deployments: the policies served on Ray Serve (models.deploy)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "policy_deployments",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=256), nullable=True),
        sa.Column("variants", sa.JSON(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_index("ix_policy_deployments_owner", "policy_deployments", ["owner"])


def downgrade() -> None:
    op.drop_index("ix_policy_deployments_owner", table_name="policy_deployments")
    op.drop_table("policy_deployments")
