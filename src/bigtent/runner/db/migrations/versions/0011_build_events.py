"""build_events: a build's history (who cancelled, bumped or restarted it, and when;
interrupted admissions); builds.submission_key (a retried submission finds its build)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 05:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("builds") as batch:
        batch.add_column(sa.Column("submission_key", sa.String(length=64), nullable=True))
    op.create_index(op.f("ix_builds_submission_key"), "builds", ["submission_key"])
    op.create_table(
        "build_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("build_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["build_id"],
            ["builds.id"],
            name=op.f("fk_build_events_build_id_builds"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_build_events")),
    )
    op.create_index(op.f("ix_build_events_build_id"), "build_events", ["build_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_build_events_build_id"), table_name="build_events")
    op.drop_table("build_events")
    op.drop_index(op.f("ix_builds_submission_key"), table_name="builds")
    with op.batch_alter_table("builds") as batch:
        batch.drop_column("submission_key")
