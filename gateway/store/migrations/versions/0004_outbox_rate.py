"""outbox: the hourly automatic-mail count answered from the index alone

Revision ID: 0004_outbox_rate
Revises: 0001
Create Date: 2026-11-27 04:40:00

`ix_outbox_rate` gains `automatic` between the address and the time. The count
behind the per-address cap (gateway.notify) filters on it; without it in the index
every candidate row was read from the table, and an outbox row's `automatic` lies
behind its composed message, in SQLite's overflow pages: that one count was a
sixth of a new ticket's time. A branch of its own off 0001, like the others.
"""

from __future__ import annotations

from alembic import op

revision = "0004_outbox_rate"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_index("ix_outbox_rate")
        batch_op.create_index("ix_outbox_rate", ["to_address", "automatic", "created_at"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_index("ix_outbox_rate")
        batch_op.create_index("ix_outbox_rate", ["to_address", "created_at"], unique=False)
