"""SQLAlchemy models: every row the daemon keeps.

Groups and agents live in the configuration, not here: a ticket refers to its
group and owner by name/address. All timestamps are stored as UTC and come back
timezone-aware (`UTCDateTime`), on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names so Alembic migrations are reproducible on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware datetimes in, aware UTC datetimes out; stored naive-UTC (SQLite has no tz)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        return value.replace(tzinfo=dt.UTC)


class Clipped(TypeDecorator[str]):
    """A String(n) that cuts a longer value to n characters rather than failing.

    PostgreSQL enforces the length and SQLite does not: without this, a well-formed
    mail with a 450-character display name was quarantined on one backend only (B20),
    and a 500-character envelope sender made even its quarantine row fail. Used for
    the columns that take what senders write (addresses, names, Message-IDs, types);
    the others hold the daemon's own values, and each bind step costs time per row.
    """

    impl = String
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.limit = length

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return value[: self.limit] if value is not None and len(value) > self.limit else value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Ticket(Base):
    __tablename__ = "tickets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Human-readable, date-based: YYYYMMDD + 5-digit daily sequence (2026112700012).
    number: Mapped[str] = mapped_column(String(32), unique=True)
    subject: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[str] = mapped_column(String(16))
    type: Mapped[str | None] = mapped_column(String(64))
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    group: Mapped[str] = mapped_column(String(200), index=True)
    owner: Mapped[str | None] = mapped_column(String(320))
    customer: Mapped[str] = mapped_column(Clipped(320), index=True)
    customer_name: Mapped[str] = mapped_column(Clipped(400), default="")
    channel: Mapped[str] = mapped_column(String(16))
    # The inbound address the customer wrote to: replies to the customer come from it.
    inbound_address: Mapped[str] = mapped_column(String(320))
    # Channel-specific return path for non-email channels (e.g. Telegram bot + chat id).
    channel_ref: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    linked_ticket_id: Mapped[int | None] = mapped_column(ForeignKey("tickets.id"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    first_response_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # SLA deadlines; next_escalation_at is their minimum, indexed for the scheduler.
    first_response_due: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    update_due: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    solution_due: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    next_escalation_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)
    escalation_level: Mapped[int] = mapped_column(Integer, default=0)
    # SLA clock state (migration 0003_sla; gateway.escalation.sla explains each):
    # the SLA in force, when the ticket entered its group (the clocks' origin), the
    # pause spans [[start, end|null], ...] as ISO strings, alarms fired per cycle.
    sla_name: Mapped[str | None] = mapped_column(String(64))
    sla_started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    sla_pauses: Mapped[list[list[str | None]] | None] = mapped_column(JSON)
    sla_fired: Mapped[dict[str, str] | None] = mapped_column(JSON)
    unanswered_since: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_agent_reply_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # `#pending <time>`: remind the owner then.
    pending_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Declared a major incident (by #major or a rule tag) at this instant.
    major_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    # Read-only views: rows are attached through their own `ticket` side. A two-way
    # relationship would load the whole collection on every append (one SELECT per
    # event/article written), which dominated ingest time. Deletion cascades in SQL.
    articles: Mapped[list[Article]] = relationship(order_by="Article.id", viewonly=True)
    participants: Mapped[list[Participant]] = relationship(
        order_by="Participant.id", viewonly=True
    )
    events: Mapped[list[Event]] = relationship(order_by="Event.id", viewonly=True)


class Participant(Base):
    """Someone who may follow up on a ticket by mail (customer, To/Cc of customer mail)."""

    __tablename__ = "participants"
    __table_args__ = (UniqueConstraint("ticket_id", "address"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(Clipped(320))
    name: Mapped[str] = mapped_column(Clipped(400), default="")
    role: Mapped[str] = mapped_column(String(16))  # customer | cc
    # Set when a delivery status notification reported a permanent failure.
    bouncing: Mapped[str | None] = mapped_column(Text)

    ticket: Mapped[Ticket] = relationship()


class Article(Base):
    """One message on a ticket: customer mail, agent reply, internal note."""

    __tablename__ = "articles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(
        ForeignKey("tickets.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))  # public | internal
    direction: Mapped[str] = mapped_column(String(8))  # in | out
    channel: Mapped[str] = mapped_column(String(16))
    sender: Mapped[str] = mapped_column(Clipped(320))
    sender_name: Mapped[str] = mapped_column(Clipped(400), default="")
    # customer | agent | system (automatic mail, reports)
    author_role: Mapped[str] = mapped_column(String(16))
    to: Mapped[list[str]] = mapped_column(JSON, default=list)
    cc: Mapped[list[str]] = mapped_column(JSON, default=list)
    subject: Mapped[str] = mapped_column(Text, default="")
    body: Mapped[str] = mapped_column(Text, default="")
    html: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str | None] = mapped_column(Clipped(998))
    automatic: Mapped[bool] = mapped_column(default=False)
    # Kept for the record, read by nobody on the hot paths: loaded only when asked for.
    raw: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    ticket: Mapped[Ticket] = relationship()
    attachments: Mapped[list[Attachment]] = relationship(
        back_populates="article", order_by="Attachment.id", cascade="all, delete-orphan"
    )


class Blob(Base):
    """Attachment content, stored once by SHA-256."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Attachment(Base):
    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    article_id: Mapped[int] = mapped_column(
        ForeignKey("articles.id", ondelete="CASCADE"), index=True
    )
    filename: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(Clipped(255))
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    size: Mapped[int] = mapped_column(BigInteger)

    article: Mapped[Article] = relationship(back_populates="attachments")
    blob: Mapped[Blob] = relationship()


class MessageId(Base):
    """Every Message-ID the daemon has seen or sent: dedup (B9), threading (B8)."""

    __tablename__ = "message_ids"

    message_id: Mapped[str] = mapped_column(Clipped(998), primary_key=True)
    ticket_id: Mapped[int | None] = mapped_column(
        ForeignKey("tickets.id", ondelete="CASCADE"), index=True
    )
    direction: Mapped[str] = mapped_column(String(8))  # in | out | dropped
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    ticket: Mapped[Ticket | None] = relationship()


class Event(Base):
    """The audit trail: routing decisions, state changes, commands, deliveries."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(
        ForeignKey("tickets.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(Clipped(320))
    kind: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    ticket: Mapped[Ticket] = relationship()


class OutboxRow(Base):
    """One message to deliver; written in the transaction that caused it."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "state", "next_attempt_at"),
        # The per-address cap counts automatic rows by time: answered from the index.
        Index("ix_outbox_rate", "to_address", "automatic", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int | None] = mapped_column(
        ForeignKey("tickets.id", ondelete="SET NULL"), index=True
    )
    channel: Mapped[str] = mapped_column(String(16))
    # ack | notify | relay | error | reminder | escalation | incident
    kind: Mapped[str] = mapped_column(String(16))
    # First recipient, for listing and the per-address rate limit.
    to_address: Mapped[str] = mapped_column(Clipped(320))
    recipients: Mapped[list[str]] = mapped_column(JSON)
    envelope_from: Mapped[str] = mapped_column(String(320))
    message_id: Mapped[str | None] = mapped_column(Clipped(998))
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    # For non-email channels: what to send (text, attachments, chat id, ...).
    # None is SQL NULL, whether the row came from the ORM or from a deferred insert.
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    state: Mapped[str] = mapped_column(String(16))  # pending | sent | held | dead
    automatic: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    ticket: Mapped[Ticket | None] = relationship()


class QuarantineRow(Base):
    """A message the pipeline could not turn into a ticket, kept with why."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    channel: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(200))
    stage: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
    message_id: Mapped[str | None] = mapped_column(Clipped(998))
    mail_from: Mapped[str | None] = mapped_column(Clipped(320))
    rcpt_tos: Mapped[list[str]] = mapped_column(JSON, default=list)
    # Indexed (migration 0006_quarantine_cmid): the IMAP channel asks, per batch,
    # which of its messages are held here already, so a re-fetch is not quarantined
    # twice.
    channel_message_id: Mapped[str | None] = mapped_column(Clipped(200), index=True)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16), default="held")  # held | retried


class SpoolRow(Base):
    """A message accepted under a burst and not yet through the pipeline.

    Under a burst the intake commits the raw message here and the channel
    acknowledges it (SMTP 250); the writer turns it into its ticket once the
    burst has passed, deleting the row in the transaction that stores the
    result (docs/design.md, "Accept first under a burst").
    """

    __tablename__ = "spool"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    channel: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(200))
    mail_from: Mapped[str | None] = mapped_column(Text)
    rcpt_tos: Mapped[list[str]] = mapped_column(JSON, default=list)
    channel_message_id: Mapped[str | None] = mapped_column(Text)
    # Read before the bytes, so a drain batch can be bounded by size.
    size: Mapped[int] = mapped_column(Integer)
    raw: Mapped[bytes] = mapped_column(LargeBinary)


class Counter(Base):
    """Named counters (the daily ticket-number sequence)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class ImapState(Base):
    """Per [[imap]] mailbox: how far ingest got (RFC 3501 UIDs) and the mailbox's health.

    `last_uid` is the highest UID whose message is committed, `acked_uid` the highest
    one moved or flagged; between them lie messages to acknowledge after a crash
    (`pending_quarantine` lists those that go to the quarantine folder). UIDs mean
    nothing under another UIDVALIDITY or `source` (server, user, folder).
    `fetch_failures` maps a UID above `last_uid` whose FETCH failed to
    `[sessions it failed in, the last error]` (migration 0005_imap_fetch): it must
    outlive the connection the failure broke, so that one unreadable message is
    quarantined after a few sessions instead of jamming the mailbox.
    `copied_uids` lists the UID sets above `acked_uid` already copied to their folder
    on a server without MOVE (migration 0007_imap_copied), so that finishing an
    interrupted acknowledgement only marks and expunges them instead of copying
    them twice.
    """

    __tablename__ = "imap_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(String(1000), default="")
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    acked_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    pending_quarantine: Mapped[list[int]] = mapped_column(JSON, default=list)
    fetch_failures: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    copied_uids: Mapped[list[str]] = mapped_column(JSON, default=list)
    connected: Mapped[bool] = mapped_column(default=False)
    mode: Mapped[str] = mapped_column(String(16), default="")  # idle | poll | ""
    ingested: Mapped[int] = mapped_column(BigInteger, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_success_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class IncidentReview(Base):
    """A major incident's review record: written when the ticket closes (migration 0003_sla).

    `timeline` is every event and article of the ticket in order, frozen at closing
    (a reopened and closed again incident gets a second record).
    """

    __tablename__ = "incident_reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ticket_id: Mapped[int] = mapped_column(
        ForeignKey("tickets.id", ondelete="CASCADE"), index=True
    )
    major_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    timeline: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
