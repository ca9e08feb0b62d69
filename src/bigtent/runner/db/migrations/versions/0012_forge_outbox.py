"""forge_outbox: reports to forges (GitHub check runs, Forgejo/Gitea commit statuses) still to
be sent, and what was sent, so a final status survives a runner restart

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 07:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "forge_outbox",
        sa.Column("evaluation_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("project", sa.String(length=256), nullable=False),
        sa.Column("forge_kind", sa.String(length=16), nullable=False),
        sa.Column("forge_target", sa.Text(), nullable=False),
        sa.Column("commit_sha", sa.String(length=64), nullable=False),
        sa.Column("forge_wanted", sa.Text(), nullable=False),
        sa.Column("wanted_seq", sa.Integer(), nullable=False),
        sa.Column("wanted_final", sa.Boolean(), nullable=False),
        sa.Column("forge_sent", sa.Text(), nullable=False),
        sa.Column("sent_seq", sa.Integer(), nullable=False),
        sa.Column("pending", sa.Boolean(), nullable=False),
        sa.Column("last_sent_at", sa.Float(), nullable=True),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_failure_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("gave_up", sa.Boolean(), nullable=False),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("claimed_until", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("evaluation_id", name=op.f("pk_forge_outbox")),
    )
    op.create_index(op.f("ix_forge_outbox_pending"), "forge_outbox", ["pending"])
    op.create_index(op.f("ix_forge_outbox_updated_at"), "forge_outbox", ["updated_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_forge_outbox_updated_at"), table_name="forge_outbox")
    op.drop_index(op.f("ix_forge_outbox_pending"), table_name="forge_outbox")
    op.drop_table("forge_outbox")
