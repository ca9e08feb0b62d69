"""step_attempts: one row per attempt of a step (venue, times, outcome, reason, next retry)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 04:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "step_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("agent_machine_id", sa.String(length=256), nullable=True),
        sa.Column("agent_name", sa.String(length=256), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("retry_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["step_id"],
            ["steps.id"],
            name=op.f("fk_step_attempts_step_id_steps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_step_attempts")),
    )
    op.create_index(op.f("ix_step_attempts_step_id"), "step_attempts", ["step_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_step_attempts_step_id"), table_name="step_attempts")
    op.drop_table("step_attempts")
