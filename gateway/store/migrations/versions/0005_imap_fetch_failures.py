"""imap_state.fetch_failures: per-UID FETCH failures that outlive the connection

Revision ID: 0005_imap_fetch
Revises: 0002_imap
Create Date: 2026-11-27 10:00:00

A server that cannot deliver one message (Dovecot answers its FETCH with BYE)
breaks the session every time; the count of failed sessions per UID has to be
stored so that message is quarantined after a few attempts instead of jamming
the mailbox. Follows 0002_imap, whose table it extends.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_imap_fetch"
down_revision = "0002_imap"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("imap_state") as batch_op:
        batch_op.add_column(sa.Column("fetch_failures", sa.JSON(), nullable=False,
                                      server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("imap_state") as batch_op:
        batch_op.drop_column("fetch_failures")
