"""What a batch has added but not yet flushed, by the keys the pipeline looks rows up by.

The intake's fast path (see `gateway.intake`) runs a whole batch of messages with
autoflush off and flushes once at the end: one flush of a batch costs about what
one flush per message did, and flushes were half of the writer's time. A lookup
then cannot see rows added earlier in the same batch, so every lookup the mail
path makes first asks `Pending` whether its key is among them, and flushes if it
is (`Pending.flush_for`): a follow-up to a ticket opened a few milliseconds
earlier still finds it. Rows are recorded as they join the session
(`transient_to_pending`), so no `session.add` site has to remember to.

Outside the fast path there is no `Pending` on the session, `pending_of` returns
None, and lookups rely on autoflush as usual.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from gateway.store.models import Blob, MessageId, OutboxRow, Participant, Ticket

_KEY = "helpdeskd.pending"


class Pending:
    """Keys of the rows added to one session since its last flush."""

    __slots__ = ("addresses", "blobs", "flushes", "message_ids", "numbers", "outbox_to")

    def __init__(self) -> None:
        self.message_ids: set[str] = set()  # MessageId rows: dedup and threading
        self.numbers: set[str] = set()  # new tickets: subject hooks, reply tokens
        self.addresses: set[str] = set()  # participants: who may follow up
        self.blobs: set[str] = set()  # attachment contents by SHA-256
        self.outbox_to: Counter[str] = Counter()  # outbox rows per first recipient
        self.flushes = 0  # how many lookups had to flush (for the bench and tests)

    def _added(self, _session: Session, obj: Any) -> None:
        if isinstance(obj, MessageId):
            self.message_ids.add(obj.message_id)
        elif isinstance(obj, Participant):
            self.addresses.add(obj.address)
        elif isinstance(obj, OutboxRow):
            self.outbox_to[obj.to_address] += 1
        elif isinstance(obj, Ticket):
            self.numbers.add(obj.number)
        elif isinstance(obj, Blob):
            self.blobs.add(obj.sha256)

    def clear(self) -> None:
        self.message_ids.clear()
        self.numbers.clear()
        self.addresses.clear()
        self.blobs.clear()
        self.outbox_to.clear()

    def any_in(self, keys: Iterable[str], among: set[str]) -> bool:
        return bool(among) and any(k in among for k in keys)

    def flush(self, session: Session) -> None:
        """Make everything added so far visible to the lookups that follow."""
        if session.new or session.dirty or session.deleted:
            session.flush()
            self.flushes += 1
        self.clear()


def track(session: Session) -> Pending:
    """Start recording what `session` adds; the intake calls this for its fast path."""
    pending = Pending()
    session.info[_KEY] = pending
    event.listen(session, "transient_to_pending", pending._added)
    return pending


def untrack(session: Session) -> None:
    pending = session.info.pop(_KEY, None)
    if pending is not None:
        event.remove(session, "transient_to_pending", pending._added)


def pending_of(session: Session) -> Pending | None:
    """The session's `Pending`, when it runs with autoflush off; else None."""
    pending: Pending | None = session.info.get(_KEY)
    return pending


@contextmanager
def autoflushing(session: Session) -> Iterator[None]:
    """Around a path whose lookups are too varied to check key by key (agent replies,
    follow-ups, reports, chat updates): flush what the batch added so far, and let the
    path autoflush as it would outside the fast path. A no-op outside the fast path.
    """
    pending = pending_of(session)
    if pending is None:
        yield
        return
    pending.flush(session)
    session.autoflush = True
    try:
        yield
    finally:
        session.autoflush = False
