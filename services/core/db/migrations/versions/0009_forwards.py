"""Forwards: each object to send to a destination, its state, attempts and the peer's answer

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "forwards",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("destination_id", sa.Integer(), nullable=True),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("what", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("path", sa.String(length=512), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("syntax", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=8), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("requested_by", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(["destination_id"], ["destinations.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_forwards_destination_id", "forwards", ["destination_id"])
    op.create_index("ix_forwards_study_uid", "forwards", ["study_uid"])
    op.create_index("ix_forwards_job_id", "forwards", ["job_id"])
    op.create_index("ix_forwards_state_next", "forwards", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_forwards_state_next", table_name="forwards")
    op.drop_index("ix_forwards_job_id", table_name="forwards")
    op.drop_index("ix_forwards_study_uid", table_name="forwards")
    op.drop_index("ix_forwards_destination_id", table_name="forwards")
    op.drop_table("forwards")
