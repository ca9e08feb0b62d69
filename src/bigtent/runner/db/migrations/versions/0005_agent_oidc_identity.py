"""agents.oidc_*: the OIDC identity of an agent that authenticated with an ID token

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-14 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_COLUMNS = (
    "oidc_issuer",
    "oidc_repository",
    "oidc_subject",
    "oidc_workflow_ref",
    "oidc_ref",
)


def upgrade() -> None:
    # NULL for token agents (auth_kind "token") and rows recorded before this revision. Text:
    # the values are claims of a verified token, whose length the runner does not choose.
    with op.batch_alter_table("agents", schema=None) as batch_op:
        for name in _COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        for name in reversed(_COLUMNS):
            batch_op.drop_column(name)
