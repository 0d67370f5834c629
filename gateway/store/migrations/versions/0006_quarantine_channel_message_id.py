"""quarantine: an index on channel_message_id

Revision ID: 0006_quarantine_cmid
Revises: 0001
Create Date: 2026-11-27 10:30:00

The IMAP channel asks once per batch which of its messages already have a held
quarantine row (a message fetched again after a crash, or after a failed
acknowledgement, must not be quarantined a second time). A branch of its own off
0001, like the others.
"""

from __future__ import annotations

from alembic import op

revision = "0006_quarantine_cmid"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("quarantine") as batch_op:
        batch_op.create_index(batch_op.f("ix_quarantine_channel_message_id"),
                              ["channel_message_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("quarantine") as batch_op:
        batch_op.drop_index(batch_op.f("ix_quarantine_channel_message_id"))
