"""Study arrivals: when housekeeping settled the study (nothing left to do until a new instance)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study_arrivals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            "ix_study_arrivals_unsettled",
            ["study_uid"],
            unique=False,
            sqlite_where=sa.text("settled_at IS NULL"),
            postgresql_where=sa.text("settled_at IS NULL"),
        )
    # studies already classified with every instance are settled; the others are looked at once
    op.execute(
        "UPDATE study_arrivals SET settled_at = CURRENT_TIMESTAMP "
        "WHERE instance_count <= classified_count"
    )


def downgrade() -> None:
    with op.batch_alter_table("study_arrivals", schema=None) as batch_op:
        batch_op.drop_index("ix_study_arrivals_unsettled")
        batch_op.drop_column("settled_at")
