"""cache retention: store paths' last use (indexed, as their publication time and NAR file
are), pins, NAR files a collection is deleting, and the record of collections

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 07:30:00.000000
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_STORE_TABLES = ("store_paths", "untrusted_store_paths")


def upgrade() -> None:
    for table in _STORE_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("last_used_at", sa.Float(), nullable=True))
        # Nothing recorded uses before this revision: every path already cached counts as used
        # now, so an upgraded cache gets a whole max_idle_days before idle paths may go.
        op.execute(sa.text(f"UPDATE {table} SET last_used_at = :now").bindparams(now=time.time()))
        for column in ("url", "created_at", "last_used_at"):
            op.create_index(op.f(f"ix_{table}_{column}"), table, [column])
    op.create_table(
        "cache_pins",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("paths", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_cache_pins")),
    )
    op.create_table(
        "cache_gc_doomed",
        sa.Column("url", sa.String(length=256), nullable=False),
        sa.Column("doomed_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("url", name=op.f("pk_cache_gc_doomed")),
    )
    op.create_table(
        "cache_gc_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("paths_deleted", sa.Integer(), nullable=False),
        sa.Column("bytes_freed", sa.BigInteger(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cache_gc_runs")),
    )


def downgrade() -> None:
    op.drop_table("cache_gc_runs")
    op.drop_table("cache_gc_doomed")
    op.drop_table("cache_pins")
    for table in _STORE_TABLES:
        for column in ("url", "created_at", "last_used_at"):
            op.drop_index(op.f(f"ix_{table}_{column}"), table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("last_used_at")
