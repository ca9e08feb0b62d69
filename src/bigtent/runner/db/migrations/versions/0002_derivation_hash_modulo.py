"""derivations.hash_modulo: Nix's hashDerivationModulo of each recorded .drv

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows recorded before this revision get theirs computed from the cached .drv
    # the first time a new derivation depends on them.
    with op.batch_alter_table("derivations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hash_modulo", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("derivations", schema=None) as batch_op:
        batch_op.drop_column("hash_modulo")
