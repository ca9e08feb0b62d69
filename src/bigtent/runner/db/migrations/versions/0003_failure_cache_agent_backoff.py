"""steps.failed_at (the failure cache) and agents.consecutive_failures (backoff that survives
a reconnect)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-10 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_CACHEABLE = ("build_failure", "timed_out", "log_limit")


def upgrade() -> None:
    # When the derivation last failed as a build failure: within the failure-cache TTL a new
    # build does not rebuild it. NULL: nothing cached (never failed, an infrastructure failure,
    # or cleared by a restart). ``finished_at`` is not enough: a cached hit or a cancel
    # rewrites it, and the TTL must count from the failure itself.
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failed_at", sa.Float(), nullable=True))
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("consecutive_failures", sa.Integer(), nullable=False, server_default="0")
        )
    steps = sa.table(
        "steps",
        sa.column("state", sa.String),
        sa.column("outcome", sa.String),
        sa.column("finished_at", sa.Float),
        sa.column("failed_at", sa.Float),
    )
    # Failures recorded before this revision are cached from when they finished.
    op.execute(
        steps.update()
        .where(steps.c.state == "failed", steps.c.outcome.in_(_CACHEABLE))
        .values(failed_at=steps.c.finished_at)
    )


def downgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("consecutive_failures")
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.drop_column("failed_at")
