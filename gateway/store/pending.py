"""What a batch has added but not yet flushed, by the keys the pipeline looks rows up by.

The intake's fast path (see `gateway.intake`) runs a whole batch of messages with
autoflush off and flushes once at the end: one flush of a batch costs about what
one flush per message did, and flushes were half of the writer's time. A lookup
then cannot see rows added earlier in the same batch, so every lookup the mail
path makes first asks `Pending` whether its key is among them, and flushes if it
is (`Pending.flush`): a follow-up to a ticket opened a few milliseconds
earlier still finds it. Rows are recorded as they join the session
(`transient_to_pending`), so no `session.add` site has to remember to.

Leaf rows -- Message-IDs, audit events, outbox rows, participants -- are not ORM
objects in the fast path (`add_row`): they wait here and go out with the flush,
one executemany per table, after the ORM has written the tickets they refer to.
SQLite cannot say which id a multi-row INSERT gave which row, so the ORM sent each
such row alone; they were most of a new ticket's flush.

Per-message queries are also answered once per batch here: whether a Message-ID
is recorded (`seen`: one query for the whole batch, plus the rows it added), the
hourly count of automatic mail to an address (`auto_mail_count`) and the daily
ticket-number counter (`next_value`, written back by `finish` before the commit).
Counting on in memory is safe because the batch's transaction holds the lock:
SQLite's writer lock (BEGIN IMMEDIATE), or on PostgreSQL the counter row's lock,
taken by the first bump. What another daemon on PostgreSQL commits meanwhile can
only make the batch fail at its flush (a duplicate Message-ID): the intake then
redoes it on the safe path, which sees it.

Outside the fast path there is no `Pending` on the session, `pending_of` returns
None, and lookups rely on autoflush as usual.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import Insert, Table, bindparam, event, insert, update
from sqlalchemy.orm import Session

from gateway.store.models import Blob, Event, MessageId, OutboxRow, Participant, Ticket
from gateway.store.models import Counter as CounterRow

_KEY = "helpdeskd.pending"
_counters = cast(Table, CounterRow.__table__)
# The leaf tables: rows nothing in a batch reads back by identity, only by key.
Leaf = type[MessageId] | type[Event] | type[OutboxRow] | type[Participant]
_INSERTS: dict[Leaf, Insert] = {
    model: insert(cast(Table, model.__table__))
    for model in (MessageId, Event, OutboxRow, Participant)
}
_SET_COUNTER = (
    update(_counters).where(_counters.c.name == bindparam("counter"))
    .values(value=bindparam("new_value"))
)


class Pending:
    """Keys of the rows added to one session since its last flush."""

    __slots__ = (
        "addresses",
        "auto_added",
        "auto_before",
        "auto_unflushed",
        "batch_ids",
        "blobs",
        "counters",
        "counters_stored",
        "deferred",
        "found_ids",
        "looked_up_ids",
        "message_ids",
        "numbers",
    )

    def __init__(self) -> None:
        self.message_ids: set[str] = set()  # MessageId rows: dedup and threading
        self.batch_ids: set[str] = set()  # every Message-ID recorded in this batch
        # Message-IDs looked up for the whole batch at its start, and those found.
        self.looked_up_ids: set[str] = set()
        self.found_ids: set[str] = set()
        self.numbers: set[str] = set()  # new tickets: subject hooks, reply tokens
        self.addresses: set[str] = set()  # participants: who may follow up
        self.blobs: set[str] = set()  # attachment contents by SHA-256
        # Automatic outbox rows per first recipient: added in this batch, of which not
        # flushed yet, and the count of the rows from before the batch (as queried).
        self.auto_added: Counter[str] = Counter()
        self.auto_unflushed: Counter[str] = Counter()
        self.auto_before: dict[str, int] = {}
        self.counters: dict[str, int] = {}  # ticket-number counters bumped in this batch
        self.counters_stored: dict[str, int] = {}  # their values in the database now
        # Leaf rows not yet written (`add_row`), in the order they were added, each
        # with the ticket whose id it needs.
        self.deferred: list[tuple[Leaf, Ticket | None, dict[str, Any]]] = []

    def _added(self, _session: Session, obj: Any) -> None:
        if isinstance(obj, MessageId):
            self._note(MessageId, {"message_id": obj.message_id})
        elif isinstance(obj, Participant):
            self._note(Participant, {"address": obj.address})
        elif isinstance(obj, OutboxRow):
            self._note(OutboxRow, {"automatic": obj.automatic, "to_address": obj.to_address})
        elif isinstance(obj, Ticket):
            self.numbers.add(obj.number)
        elif isinstance(obj, Blob):
            self.blobs.add(obj.sha256)

    def _note(self, model: Leaf, values: dict[str, Any]) -> None:
        """Record the lookup keys of a leaf row added, as an ORM object or deferred."""
        if model is MessageId:
            self.message_ids.add(values["message_id"])
            self.batch_ids.add(values["message_id"])
        elif model is Participant:
            self.addresses.add(values["address"])
        elif model is OutboxRow and values["automatic"]:
            self.auto_added[values["to_address"]] += 1
            self.auto_unflushed[values["to_address"]] += 1

    def defer(self, model: Leaf, ticket: Ticket | None, values: dict[str, Any]) -> None:
        self._note(model, values)
        self.deferred.append((model, ticket, values))

    def clear(self) -> None:
        """Everything added so far is flushed (batch-long tallies stay)."""
        self.message_ids.clear()
        self.numbers.clear()
        self.addresses.clear()
        self.blobs.clear()
        self.auto_unflushed.clear()

    def seen(self, key: str) -> bool | None:
        """Whether a Message-ID is recorded, if this batch knows; None: ask the database."""
        if key in self.batch_ids:
            return True
        if key in self.looked_up_ids:
            return key in self.found_ids
        return None

    def auto_mail_count(self, address: str, query: Callable[[], int]) -> int:
        """Automatic mail to `address` in the window: `query()` (the flushed rows) is
        asked once per address and batch; the batch's own rows are counted here."""
        before = self.auto_before.get(address)
        if before is None:
            flushed_of_batch = self.auto_added[address] - self.auto_unflushed[address]
            before = self.auto_before[address] = query() - flushed_of_batch
        return before + self.auto_added[address]

    def next_value(self, name: str, bump: Callable[[], int | None]) -> int | None:
        """The counter's next value: `bump()` (UPDATE ... RETURNING, which takes the row's
        lock) the first time in the batch, counted here after; None if the row is missing."""
        value = self.counters.get(name)
        if value is None:
            got = bump()
            if got is None:
                return None
            self.stored_counter(name, got)
            return got
        self.counters[name] = value + 1
        return value + 1

    def stored_counter(self, name: str, value: int) -> None:
        """The counter row holds `value` now (bumped, or just created)."""
        self.counters[name] = self.counters_stored[name] = value

    def any_in(self, keys: Iterable[str], among: set[str]) -> bool:
        return bool(among) and any(k in among for k in keys)

    def flush(self, session: Session) -> None:
        """Make everything added so far visible to the lookups that follow."""
        if session.new or session.dirty or session.deleted:
            session.flush()
        self._write_deferred(session)
        self.clear()

    def _write_deferred(self, session: Session) -> None:
        if not self.deferred:
            return
        # One executemany per table. Every table here refers only to tickets, which
        # the ORM flush before this one has written; within a table the rows keep the
        # order they were added in (audit events are listed by id).
        tables: dict[Leaf, list[dict[str, Any]]] = {}
        for model, ticket, values in self.deferred:
            values["ticket_id"] = ticket.id if ticket is not None else None
            tables.setdefault(model, []).append(values)
        connection = session.connection()
        for model, rows in tables.items():
            connection.execute(_INSERTS[model], rows)
        self.deferred.clear()


def track(session: Session) -> Pending:
    """Start recording what `session` adds; the intake calls this for its fast path."""
    pending = Pending()
    session.info[_KEY] = pending
    event.listen(session, "transient_to_pending", pending._added)
    return pending


def finish(session: Session) -> None:
    """Before the commit: write what is deferred, and the counters `next_value` advanced."""
    pending = pending_of(session)
    if pending is None:
        return
    pending.flush(session)
    # A batch that took one number left the row as its bump wrote it.
    advanced = [{"counter": name, "new_value": value} for name, value in pending.counters.items()
                if value != pending.counters_stored.get(name)]
    if advanced:
        session.connection().execute(_SET_COUNTER, advanced)


def add_row(session: Session, model: Leaf, ticket: Ticket | None,
            values: dict[str, Any]) -> None:
    """Add a leaf row: a Message-ID seen or sent, an audit event, an outbox row, a participant.

    In the fast path it is not an ORM object: it is written with the batch's next
    flush, each table's rows in one executemany. As ORM objects these rows were most
    of a new ticket's flush: SQLite cannot say which id a multi-row INSERT gave which
    row, so SQLAlchemy sent each alone, with RETURNING. Elsewhere -- inside
    `autoflushing`, inside a savepoint, outside the intake -- it is an ORM object, so
    that the path's own lookups see it as they would anywhere else, and rolling the
    savepoint back takes it along. Deferred rows of one table are written with one
    statement, so `values` must always name the same columns for a table.
    """
    pending = pending_of(session)
    if pending is None or session.autoflush or session.in_nested_transaction():
        session.add(model(ticket=ticket, **values))
        return
    pending.defer(model, ticket, values)


def add_message_id(session: Session, message_id: str, ticket: Ticket | None,
                   direction: str, now: dt.datetime) -> None:
    """Record a Message-ID seen or sent (dedup, B9; threading, B8)."""
    add_row(session, MessageId, ticket,
            {"message_id": message_id, "direction": direction, "created_at": now})


def add_event(session: Session, ticket: Ticket, *, at: dt.datetime, actor: str, kind: str,
              data: dict[str, Any] | None = None) -> None:
    """Append to a ticket's audit trail."""
    add_row(session, Event, ticket,
            {"at": at, "actor": actor, "kind": kind, "data": data if data is not None else {}})


def flush(session: Session) -> None:
    """Flush the session, deferred rows included: before a savepoint, so that rolling
    it back cannot undo what came before it."""
    pending = pending_of(session)
    if pending is None:
        session.flush()
    else:
        pending.flush(session)


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
