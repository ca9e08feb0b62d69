"""cached_failure_hits: a build that failed a step from the failure cache, recorded for that
build (pointing at the attempt that really ran) instead of written over the step's record

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 07:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cached_failure_hits",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("build_id", sa.Integer(), nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column("attempt_id", sa.Integer(), nullable=True),
        sa.Column("hit_at", sa.Float(), nullable=False),
        sa.Column("failed_at", sa.Float(), nullable=False),
        sa.Column("failed_outcome", sa.String(length=32), nullable=False),
        sa.Column("cached_until", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["build_id"],
            ["builds.id"],
            name=op.f("fk_cached_failure_hits_build_id_builds"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["step_id"],
            ["steps.id"],
            name=op.f("fk_cached_failure_hits_step_id_steps"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["attempt_id"],
            ["step_attempts.id"],
            name=op.f("fk_cached_failure_hits_attempt_id_step_attempts"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cached_failure_hits")),
    )
    op.create_index(op.f("ix_cached_failure_hits_build_id"), "cached_failure_hits", ["build_id"])
    op.create_index(op.f("ix_cached_failure_hits_step_id"), "cached_failure_hits", ["step_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_cached_failure_hits_step_id"), table_name="cached_failure_hits")
    op.drop_index(op.f("ix_cached_failure_hits_build_id"), table_name="cached_failure_hits")
    op.drop_table("cached_failure_hits")
