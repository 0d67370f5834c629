"""The spool: messages accepted under a burst, waiting for the pipeline.

A spooled message is committed (its raw bytes and envelope, nothing parsed), so
its channel may acknowledge it; the intake writer takes spooled messages back
in the order they came (`claim`) and deletes each in the same transaction that
stores what the pipeline made of it. A crash in between leaves the row, and the
next start processes it: nothing is lost and nothing is done twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, delete, func, insert, select
from sqlalchemy.orm import Session

from gateway.message import Channel, Inbound
from gateway.store.models import SpoolRow


def put(connection: Connection | Session, inbounds: Sequence[Inbound]) -> None:
    """Add the messages to the spool (one executemany); the caller commits."""
    connection.execute(insert(SpoolRow), [
        {"received_at": m.received_at, "channel": m.channel.value, "source": m.source,
         "mail_from": m.mail_from, "rcpt_tos": list(m.rcpt_tos),
         "channel_message_id": m.channel_message_id, "size": len(m.raw), "raw": m.raw}
        for m in inbounds
    ])


def count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(SpoolRow)) or 0


def next_batch(session: Session, limit: int, max_bytes: int) -> list[int]:
    """Ids of the oldest spooled messages: at most `limit`, and no more than `max_bytes`
    of them unless the first alone is larger."""
    ids: list[int] = []
    total = 0
    for row_id, size in session.execute(
            select(SpoolRow.id, SpoolRow.size).order_by(SpoolRow.id).limit(limit)):
        if ids and total + size > max_bytes:
            break
        ids.append(row_id)
        total += size
    return ids


def claim(session: Session, ids: Sequence[int]) -> list[Inbound]:
    """Delete the rows and return their messages, oldest first, inside the caller's
    transaction: if it rolls back, the rows are back. A row another process claimed
    meanwhile (two daemons on one PostgreSQL) is simply not returned."""
    rows = list(session.execute(
        delete(SpoolRow).where(SpoolRow.id.in_(ids)).returning(
            SpoolRow.id, SpoolRow.received_at, SpoolRow.channel, SpoolRow.source,
            SpoolRow.mail_from, SpoolRow.rcpt_tos, SpoolRow.channel_message_id,
            SpoolRow.raw),
        execution_options={"synchronize_session": False},
    ))
    rows.sort(key=lambda r: r.id)
    return [Inbound(channel=Channel(r.channel), raw=r.raw, received_at=r.received_at,
                    source=r.source, mail_from=r.mail_from, rcpt_tos=tuple(r.rcpt_tos),
                    channel_message_id=r.channel_message_id)
            for r in rows]
