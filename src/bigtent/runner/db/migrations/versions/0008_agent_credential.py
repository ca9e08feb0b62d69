"""agents.credential: the name of the token a token agent registered with

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 21:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for OIDC agents and rows recorded before this revision (any token may then claim
    # the machine id once, which binds it).
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("credential", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("credential")
