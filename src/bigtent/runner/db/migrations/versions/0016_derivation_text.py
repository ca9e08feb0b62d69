"""derivations.text: the .drv's ATerm text, sent to agents with a step's assignment

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06 16:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows recorded before this revision have none; their steps' agents fetch the
    # .drv from the cache as before. Plain ALTER TABLE (SQLite has ADD and, since 3.35, DROP
    # COLUMN): a batch copy of the table would drop it, which the steps' foreign keys refuse.
    op.add_column("derivations", sa.Column("text", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("derivations", "text")
