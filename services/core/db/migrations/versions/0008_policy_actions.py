"""Policies that act (compress, classify, forward) and jobs of two kinds

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("auto_compress", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("keep_copy", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
        batch_op.add_column(sa.Column("forward_to", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("forward_what", sa.JSON(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), server_default="classify", nullable=False)
        )
        batch_op.add_column(sa.Column("options", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("options")
        batch_op.drop_column("kind")
    with op.batch_alter_table("policies", schema=None) as batch_op:
        batch_op.drop_column("forward_what")
        batch_op.drop_column("forward_to")
        batch_op.drop_column("keep_copy")
        batch_op.drop_column("auto_compress")
