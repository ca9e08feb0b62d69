"""launches: the autoscaler's workflow_dispatch launches and their states

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-16 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "launches",
        sa.Column("launch_id", sa.String(length=64), nullable=False),
        sa.Column("pool", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("agent_machine_id", sa.String(length=256), nullable=True),
        sa.Column("agent_name", sa.String(length=256), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("retry_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("launch_id", name=op.f("pk_launches")),
    )
    op.create_index(op.f("ix_launches_state"), "launches", ["state"])
    op.create_index(op.f("ix_launches_created_at"), "launches", ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_launches_created_at"), table_name="launches")
    op.drop_index(op.f("ix_launches_state"), table_name="launches")
    op.drop_table("launches")
