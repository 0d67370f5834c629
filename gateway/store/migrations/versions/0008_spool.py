"""spool: messages accepted under a burst, waiting for the pipeline

Revision ID: 0008_spool
Revises: 0001
Create Date: 2026-11-27 12:00:00

Under a burst the intake commits a message's raw bytes here and SMTP answers
250; the writer runs the pipeline on it once the burst has passed. A branch of
its own off 0001, like the others.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.store.models import UTCDateTime

revision = "0008_spool"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spool",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("mail_from", sa.Text(), nullable=True),
        sa.Column("rcpt_tos", sa.JSON(), nullable=False),
        sa.Column("channel_message_id", sa.Text(), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spool")),
    )


def downgrade() -> None:
    op.drop_table("spool")
