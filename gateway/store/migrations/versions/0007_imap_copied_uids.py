"""imap_state.copied_uids: what a server without MOVE already copied

Revision ID: 0007_imap_copied
Revises: 0005_imap_fetch
Create Date: 2026-11-27 11:00:00

Without MOVE a message leaves the folder by UID COPY, STORE \\Deleted and UID
EXPUNGE. A connection lost after the COPY made the recovery copy it again; the
UID sets already copied are now stored between the steps. Follows
0005_imap_fetch, on the IMAP branch.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_imap_copied"
down_revision = "0005_imap_fetch"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("imap_state") as batch_op:
        batch_op.add_column(sa.Column("copied_uids", sa.JSON(), nullable=False,
                                      server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("imap_state") as batch_op:
        batch_op.drop_column("copied_uids")
