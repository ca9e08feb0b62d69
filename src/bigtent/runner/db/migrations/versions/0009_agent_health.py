"""agents.health_last_error: an agent's last infrastructure error, shown while it is unhealthy

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 04:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("health_last_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("health_last_error")
