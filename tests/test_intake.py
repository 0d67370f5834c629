"""The intake's batches: one flush per batch, and the same decisions as one at a time.

A batch runs with autoflush off and flushes once, before the commit (the intake's
fast path). These tests put messages that depend on each other into one batch and
check that every one of them is decided exactly as it would be alone: a follow-up
finds the ticket opened a moment earlier, a duplicate is a duplicate, an attachment
is stored once, the rate limit counts the batch, a bad message is quarantined
without losing the rest, and two daemons writing at once never share a number.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session
from support.app import demo_config
from support.mailer import make_mail

from gateway.chat import encode_raw
from gateway.config import Settings, parse_settings
from gateway.daemon import App
from gateway.message import Channel, Inbound
from gateway.pipeline import Disposition, StageError, quarantine
from gateway.store.models import (
    Article,
    Blob,
    OutboxRow,
    Participant,
    QuarantineRow,
    Ticket,
)


@pytest.fixture
def app(settings: Settings, clock: Any) -> Iterator[App]:
    app = App(settings, clock=clock)
    yield app
    app.engine.dispose()


def mail_in(raw: bytes, mail_from: str | None = "dana@users.test") -> Inbound:
    return Inbound(Channel.EMAIL, raw, dt.datetime.now(dt.UTC), "test", mail_from,
                   ("help@helpdesk.test",))


def batch(app: App, *raws: bytes | Inbound, redone: int = 0) -> list[Disposition]:
    """Ingest the messages as one batch, as a burst would; `redone`: whether the fast
    path is expected to give the batch up (else each message's own decision is tested
    on the fast path, not rescued by the safe one).
    """
    before = app.intake.redone
    results = app.intake._process_batch([r if isinstance(r, Inbound) else mail_in(r)
                                         for r in raws])
    assert app.intake.redone - before == redone
    return results


def outcomes(results: list[Disposition]) -> list[str]:
    return [r.outcome.value for r in results]


def count(app: App, what: Any, *where: Any) -> int:
    with app.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(what).where(*where)) or 0)


def test_a_batch_of_new_tickets_is_flushed_once(app: App) -> None:
    batch(app, make_mail("The day's first ticket creates the day's counter row"))
    flushes: list[int] = []

    def counted(session: Session, _context: Any) -> None:
        flushes.append(len(session.new))

    event.listen(Session, "after_flush", counted)
    try:
        results = batch(app, *(make_mail(f"Request {i}", sender=f"u{i}@users.test")
                               for i in range(16)))
    finally:
        event.remove(Session, "after_flush", counted)
    assert outcomes(results) == ["created"] * 16
    assert len(flushes) == 1  # at the commit: tickets, articles, outbox rows together
    assert count(app, Ticket) == 17
    # Two outbound mails per ticket (acknowledgement, agent notification), each linked.
    assert count(app, OutboxRow, OutboxRow.ticket_id.is_not(None)) == 34


def test_follow_up_in_the_same_batch_finds_the_new_ticket_by_references(app: App) -> None:
    first = make_mail("VM quota", message_id="<first@users.test>")
    second = make_mail("Re: VM quota", "One more detail.", in_reply_to="<first@users.test>",
                       references="<first@users.test>")
    results = batch(app, first, second)
    assert outcomes(results) == ["created", "followup"]
    assert results[0].ticket == results[1].ticket
    assert count(app, Ticket) == 1 and count(app, Article) == 2


def test_follow_up_in_the_same_batch_finds_the_new_ticket_by_its_hook(app: App, clock: Any) -> None:
    number = clock.now.strftime("%Y%m%d") + "00001"  # the day's first ticket
    first = make_mail("Cannot log in")
    second = make_mail(f"{app.hooks.format(number)} still broken", message_id="<x@users.test>")
    results = batch(app, first, second)
    assert [(r.outcome.value, r.ticket) for r in results] == [
        ("created", number), ("followup", number)]


def test_a_cc_added_earlier_in_the_batch_may_follow_up(app: App) -> None:
    opened = batch(app, make_mail("Storage", message_id="<s1@users.test>"))[0]
    # Dana follows up copying Erin; Erin answers the original thread in the same batch.
    dana = make_mail("Re: Storage", cc="Erin <erin@users.test>", in_reply_to="<s1@users.test>")
    erin = make_mail("Re: Storage", "Same for me.", sender="Erin <erin@users.test>",
                     in_reply_to="<s1@users.test>")
    results = batch(app, dana, mail_in(erin, "erin@users.test"))
    assert [(r.outcome.value, r.ticket) for r in results] == [
        ("followup", opened.ticket), ("followup", opened.ticket)]
    assert count(app, Participant, Participant.address == "erin@users.test") == 1


def test_the_same_message_twice_in_one_batch_is_one_article(app: App) -> None:
    raw = make_mail("Twice", message_id="<twice@users.test>")
    assert outcomes(batch(app, raw, raw, make_mail("Other"))) == [
        "created", "duplicate", "created"]
    assert count(app, Article) == 2


def test_a_message_from_an_earlier_batch_is_a_duplicate(app: App) -> None:
    raw = make_mail("Once", message_id="<once@users.test>")
    assert outcomes(batch(app, raw)) == ["created"]
    assert outcomes(batch(app, make_mail("New"), raw)) == ["created", "duplicate"]
    assert count(app, Article) == 2


def test_the_same_attachment_in_one_batch_is_stored_once(app: App) -> None:
    def with_log(subject: str) -> bytes:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "dana@users.test", "help@helpdesk.test", subject
        msg.set_content("log attached")
        msg.add_attachment(b"same log\n" * 100, maintype="text", subtype="plain",
                           filename="job.log")
        return msg.as_bytes()

    assert outcomes(batch(app, with_log("first"), with_log("second"))) == ["created"] * 2
    assert count(app, Blob) == 1


def test_the_hourly_cap_on_automatic_mail_counts_the_batch(
    tmp_path: Path, db_url: str, clock: Any
) -> None:
    data = demo_config(tmp_path, db_url, outbound={"maildir": str(tmp_path / "out"),
                                                   "auto_mail_per_hour": 2})
    app = App(parse_settings(data, base_dir=tmp_path, environ={}), clock=clock)
    try:
        results = batch(app, *(make_mail(f"Problem {i}") for i in range(3)))
        assert outcomes(results) == ["created"] * 3
        # Three tickets, but only two acknowledgements to Dana within the hour.
        assert count(app, OutboxRow, OutboxRow.kind == "ack") == 2
        # The next batch counts what earlier ones sent: none for Dana, one for Erin.
        erin = make_mail("Hello", sender="erin@users.test")
        assert outcomes(batch(app, make_mail("Problem 4"), erin)) == ["created"] * 2
        assert count(app, OutboxRow, OutboxRow.kind == "ack") == 3
    finally:
        app.engine.dispose()


def test_a_bad_message_is_quarantined_and_the_rest_of_its_batch_kept(app: App, clock: Any) -> None:
    nobody = make_mail("Who am I", sender="")  # no From, no Reply-To, no envelope sender
    results = batch(app, make_mail("one"), mail_in(nobody, None), make_mail("two"), redone=1)
    assert outcomes(results) == ["created", "quarantined", "created"]
    assert "no-sender" in results[1].reason
    assert count(app, QuarantineRow) == 1
    # The abandoned first attempt left no gap in the day's numbers.
    day = clock.now.strftime("%Y%m%d")
    assert [results[0].ticket, results[2].ticket] == [f"{day}00001", f"{day}00002"]


def test_overlong_names_and_senders_are_kept_short_on_every_backend(app: App) -> None:
    """PostgreSQL enforces column lengths, SQLite does not: a 450-character display
    name must not quarantine a well-formed mail (B20) on one of them, nor a
    500-character envelope sender make a quarantine row fail (and its whole batch
    answer 451 with it)."""
    long_name = make_mail("Long Cc", cc=f'"{"N" * 450}" <eve@users.test>')
    sender = "x" * 490 + "@users.test"
    nobody = make_mail("Who am I", sender="")
    assert outcomes(batch(app, long_name, mail_in(nobody, sender))) == ["created"] * 2
    with app.sessions() as s, s.begin():
        [eve] = s.scalars(select(Participant).where(Participant.address == "eve@users.test"))
        assert eve.name == "N" * 400  # the column's length
        row = quarantine(s, mail_in(nobody, sender), StageError("parse", "test", "x"),
                         dt.datetime.now(dt.UTC))
        s.expire(row)  # as stored, not as given
        assert row.mail_from == sender[:320]


def test_chat_messages_in_one_batch_go_to_the_same_ticket(
    tmp_path: Path, db_url: str, clock: Any
) -> None:
    data = demo_config(tmp_path, db_url, telegram=[{
        "name": "helpbot", "token": "123:test", "inbound_address": "help@helpdesk.test",
        "base_url": "http://127.0.0.1:9/bot", "base_file_url": "http://127.0.0.1:9/file/bot"}])
    app = App(parse_settings(data, base_dir=tmp_path, environ={}), clock=clock)

    def update(update_id: int, text: str) -> Inbound:
        message = {"message_id": update_id, "date": 1700000000, "text": text,
                   "chat": {"id": 5, "type": "private"},
                   "from": {"id": 5, "is_bot": False, "first_name": "Dana"}}
        raw = encode_raw("helpbot", {"update_id": update_id, "message": message})
        return Inbound(Channel.TELEGRAM, raw, clock.now, "telegram:helpbot", None, ())

    try:
        results = batch(app, update(1, "The portal is down"), update(2, "Since 9:00"))
        assert outcomes(results) == ["created", "followup"]
        assert results[0].ticket == results[1].ticket
    finally:
        app.engine.dispose()


def test_a_message_id_recorded_in_a_rolled_back_savepoint_is_not_kept(
    app: App, clock: Any
) -> None:
    """On the fast path Message-IDs are written in bulk at the flush, except inside a
    savepoint (the SLA observer's), whose rollback must take them along."""
    from gateway.store.models import MessageId
    from gateway.store.pending import add_message_id, finish, track, untrack

    with app.sessions() as session:
        track(session)
        try:
            with session.begin(), session.no_autoflush:
                add_message_id(session, "kept@helpdesk.test", None, "out", clock.now)
                nested = session.begin_nested()
                add_message_id(session, "undone@helpdesk.test", None, "out", clock.now)
                nested.rollback()
                finish(session)
        finally:
            untrack(session)
    with app.sessions() as s:
        assert set(s.scalars(select(MessageId.message_id))) == {"kept@helpdesk.test"}


def test_two_daemons_writing_batches_at_once_never_share_a_ticket_number(
    settings: Settings, clock: Any
) -> None:
    """The fast path counts ticket numbers on in memory after one bump per batch: safe
    only because that bump holds the counter row (PostgreSQL) or the writer lock
    (SQLite) until the commit. Two daemons on one database, batches in parallel."""
    import threading

    apps = [App(settings, clock=clock) for _ in range(2)]
    batch(apps[0], make_mail("the day's counter row exists"))
    results: list[Disposition] = []
    lock = threading.Lock()

    def write(app: App, name: str) -> None:
        for b in range(5):
            got = app.intake._process_batch([
                mail_in(make_mail(f"{name} {b}.{i}", sender=f"{name}{i}@users.test"))
                for i in range(8)])
            with lock:
                results.extend(got)

    threads = [threading.Thread(target=write, args=(app, f"d{n}"))
               for n, app in enumerate(apps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    numbers = [r.ticket for r in results]
    assert outcomes(results) == ["created"] * 80
    assert len(set(numbers)) == 80
    assert count(apps[0], Ticket) == 81
    # ...on the fast path itself, not rescued by the unique index and a redo.
    assert sum(app.intake.redone for app in apps) == 0
    for app in apps:
        app.engine.dispose()
