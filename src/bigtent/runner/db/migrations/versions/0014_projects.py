"""Nix CI: ci_projects, ci_evaluations, ci_jobs, ci_webhook_deliveries

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 07:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ci_projects",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_ci_projects")),
    )
    op.create_table(
        "ci_evaluations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("ref", sa.String(length=256), nullable=False),
        sa.Column("commit_sha", sa.String(length=64), nullable=False),
        sa.Column("fetch_ref", sa.String(length=256), nullable=False),
        sa.Column("trigger", sa.String(length=32), nullable=False),
        sa.Column("pull_request", sa.Integer(), nullable=True),
        sa.Column("trusted", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("build_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("superseded_by", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["build_id"],
            ["builds.id"],
            name=op.f("fk_ci_evaluations_build_id_builds"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ci_evaluations")),
        sa.UniqueConstraint("project", "ref", "commit_sha", name="uq_ci_evaluations_commit"),
    )
    op.create_index(op.f("ix_ci_evaluations_state"), "ci_evaluations", ["state"])
    op.create_index(op.f("ix_ci_evaluations_project"), "ci_evaluations", ["project"])
    op.create_table(
        "ci_jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("evaluation_id", sa.Integer(), nullable=False),
        sa.Column("attr", sa.String(length=512), nullable=False),
        sa.Column("drv_path", sa.String(length=256), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["evaluation_id"],
            ["ci_evaluations.id"],
            name=op.f("fk_ci_jobs_evaluation_id_ci_evaluations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ci_jobs")),
        sa.UniqueConstraint("evaluation_id", "attr", name="uq_ci_jobs_attr"),
    )
    op.create_index(op.f("ix_ci_jobs_evaluation_id"), "ci_jobs", ["evaluation_id"])
    op.create_table(
        "ci_webhook_deliveries",
        sa.Column("delivery_id", sa.String(length=128), nullable=False),
        sa.Column("forge", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("delivery_id", name=op.f("pk_ci_webhook_deliveries")),
    )
    op.create_index(
        op.f("ix_ci_webhook_deliveries_received_at"), "ci_webhook_deliveries", ["received_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_ci_webhook_deliveries_received_at"), table_name="ci_webhook_deliveries")
    op.drop_table("ci_webhook_deliveries")
    op.drop_index(op.f("ix_ci_jobs_evaluation_id"), table_name="ci_jobs")
    op.drop_table("ci_jobs")
    op.drop_index(op.f("ix_ci_evaluations_project"), table_name="ci_evaluations")
    op.drop_index(op.f("ix_ci_evaluations_state"), table_name="ci_evaluations")
    op.drop_table("ci_evaluations")
    op.drop_table("ci_projects")
