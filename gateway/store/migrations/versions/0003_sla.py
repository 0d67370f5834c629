"""sla: SLA clock state on tickets, and major-incident review records

Revision ID: 0003_sla
Revises: 0001
Create Date: 2026-11-27 03:00:00

A branch of its own off 0001 (the store upgrades to "heads"), so it does not
depend on the order in which other features add their migrations. Every new
ticket column is nullable: tickets from before the upgrade simply have no SLA
state until their next change recomputes it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import gateway.store.models

revision = "0003_sla"
down_revision = "0001"
branch_labels = None
depends_on = None

_UTC = gateway.store.models.UTCDateTime


def upgrade() -> None:
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sla_name", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("sla_started_at", _UTC(), nullable=True))
        batch_op.add_column(sa.Column("sla_pauses", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("sla_fired", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("unanswered_since", _UTC(), nullable=True))
        batch_op.add_column(sa.Column("last_agent_reply_at", _UTC(), nullable=True))
        batch_op.add_column(sa.Column("pending_until", _UTC(), nullable=True))
        batch_op.add_column(sa.Column("major_at", _UTC(), nullable=True))

    op.create_table(
        "incident_reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=False),
        sa.Column("major_at", _UTC(), nullable=False),
        sa.Column("closed_at", _UTC(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("timeline", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["ticket_id"], ["tickets.id"],
            name=op.f("fk_incident_reviews_ticket_id_tickets"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_incident_reviews")),
    )
    with op.batch_alter_table("incident_reviews", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_incident_reviews_ticket_id"), ["ticket_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("incident_reviews", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_incident_reviews_ticket_id"))
    op.drop_table("incident_reviews")
    with op.batch_alter_table("tickets", schema=None) as batch_op:
        for column in ("major_at", "pending_until", "last_agent_reply_at", "unanswered_since",
                       "sla_fired", "sla_pauses", "sla_started_at", "sla_name"):
            batch_op.drop_column(column)
