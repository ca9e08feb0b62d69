"""trust scoping: steps.trusted, untrusted_store_paths, agents.trusted

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-16 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every step recorded before this revision was made for a build of that time, all of
    # which were trusted (builds.trusted was always written true).
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("trusted", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch_op.drop_constraint("uq_steps_drv_path", type_="unique")
        batch_op.create_unique_constraint("uq_steps_drv_path_trusted", ["drv_path", "trusted"])
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("trusted", sa.Boolean(), nullable=False, server_default=sa.true())
        )
    op.create_table(
        "untrusted_store_paths",
        sa.Column("path", sa.String(length=256), nullable=False),
        sa.Column("hash_part", sa.String(length=32), nullable=False),
        sa.Column("nar_hash", sa.String(length=128), nullable=False),
        sa.Column("nar_size", sa.BigInteger(), nullable=False),
        sa.Column("url", sa.String(length=256), nullable=False),
        sa.Column("compression", sa.String(length=16), nullable=False),
        sa.Column("file_hash", sa.String(length=128), nullable=False),
        sa.Column("file_size", sa.BigInteger(), nullable=False),
        sa.Column("references", sa.Text(), nullable=False),
        sa.Column("deriver", sa.String(length=256), nullable=True),
        sa.Column("ca", sa.String(length=256), nullable=True),
        sa.Column("sig", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("path", name=op.f("pk_untrusted_store_paths")),
        sa.UniqueConstraint("hash_part", name=op.f("uq_untrusted_store_paths_hash_part")),
    )


def downgrade() -> None:
    # Untrusted steps cannot survive the old one-step-per-derivation constraint: they go (with
    # their dependency and build links), and so does the untrusted cache's index.
    op.drop_table("untrusted_store_paths")
    op.execute(
        "DELETE FROM step_deps WHERE step_id IN (SELECT id FROM steps WHERE NOT trusted) "
        "OR dep_id IN (SELECT id FROM steps WHERE NOT trusted)"
    )
    op.execute("DELETE FROM build_steps WHERE step_id IN (SELECT id FROM steps WHERE NOT trusted)")
    op.execute(
        "UPDATE build_roots SET step_id = NULL "
        "WHERE step_id IN (SELECT id FROM steps WHERE NOT trusted)"
    )
    op.execute("DELETE FROM steps WHERE NOT trusted")
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("trusted")
    with op.batch_alter_table("steps", schema=None) as batch_op:
        batch_op.drop_constraint("uq_steps_drv_path_trusted", type_="unique")
        batch_op.create_unique_constraint("uq_steps_drv_path", ["drv_path"])
        batch_op.drop_column("trusted")
