"""The store: migrations, ticket numbers, attachments stored once, rule reload in a live app."""

from __future__ import annotations

import datetime as dt
import threading
from email.message import EmailMessage
from typing import Any

from sqlalchemy import event, func, inspect, select
from support.mailer import make_mail, send

from gateway.config import Settings
from gateway.daemon import App
from gateway.message import Channel, Inbound
from gateway.pipeline import next_ticket_number
from gateway.store.db import make_engine, make_sessionmaker, migrate
from gateway.store.models import Attachment, Base, Blob, Ticket


def inbound(raw: bytes, when: dt.datetime) -> Inbound:
    return Inbound(Channel.EMAIL, raw, when, "test", "dana@users.test", ("help@helpdesk.test",))


def test_migrations_create_every_table(db_url: str) -> None:
    engine = make_engine(db_url)
    migrate(engine)
    migrate(engine)  # idempotent: a restart upgrades nothing
    tables = set(inspect(engine).get_table_names())
    assert {t.name for t in Base.metadata.sorted_tables} <= tables
    assert "alembic_version" in tables
    engine.dispose()


def test_ticket_numbers_are_daily_sequences(settings: Settings) -> None:
    app = App(settings)
    sessions = app.sessions
    day1 = dt.datetime(2026, 11, 27, 23, 59, tzinfo=dt.UTC)
    day2 = day1 + dt.timedelta(minutes=2)
    with sessions() as s, s.begin():
        numbers = [next_ticket_number(s, day1) for _ in range(3)] + [next_ticket_number(s, day2)]
    assert numbers == ["2026112700001", "2026112700002", "2026112700003", "2026112800001"]
    app.engine.dispose()


def test_ticket_numbers_unique_under_concurrency(settings: Settings) -> None:
    """Several writers at once (threads here; several daemons on PostgreSQL)."""
    engine = make_engine(settings.database_url)
    migrate(engine)
    sessions = make_sessionmaker(engine)
    now = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)
    got: list[str] = []
    lock = threading.Lock()

    def allocate() -> None:
        for _ in range(20):
            with sessions() as s, s.begin():
                n = next_ticket_number(s, now)
            with lock:
                got.append(n)

    threads = [threading.Thread(target=allocate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 80 and len(set(got)) == 80
    engine.dispose()


def with_attachment(subject: str, data: bytes, name: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "dana@users.test"
    msg["To"] = "help@helpdesk.test"
    msg["Subject"] = subject
    msg.set_content("see attached")
    msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg.as_bytes()


def test_attachments_stored_once_by_content_hash(settings: Settings, clock: Any) -> None:
    app = App(settings, clock=clock)
    blob = b"\x00\x01binary\x00with NULs\xff" * 100
    app.intake.ingest_now(inbound(with_attachment("one", blob, "a.bin"), clock.now))
    app.intake.ingest_now(inbound(with_attachment("two", blob, "Übersicht.bin"), clock.now))
    with app.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Blob)) == 1
        atts = list(s.scalars(select(Attachment).order_by(Attachment.id)))
        assert [a.filename for a in atts] == ["a.bin", "Übersicht.bin"]
        assert s.scalars(select(Blob)).one().data == blob  # byte-exact, NULs included
        assert s.scalar(select(func.count()).select_from(Ticket)) == 2
    app.engine.dispose()


async def test_rules_reload_in_a_running_daemon(app: App, settings: Settings) -> None:
    rules = settings.path(settings.daemon.rules_dir) / "05-orders.yaml"
    rules.write_text("rules:\n  - name: orders\n    when: {subject: {contains: order}}\n"
                     "    then: {group: Orders}\n")
    assert app.rules.reload() is None  # what SIGHUP and the file watcher call
    await send(app.channels[0].port, make_mail("My order is late"))  # type: ignore[attr-defined]
    # A broken edit keeps the last good rule set running.
    rules.write_text("rules:\n  - name: orders\n    when: {subject: {regex: '(x'}}\n"
                     "    then: {group: Orders}\n")
    assert app.rules.reload() is not None
    await send(app.channels[0].port, make_mail("Another order"))  # type: ignore[attr-defined]
    with app.sessions() as s:
        groups = list(s.scalars(select(Ticket.group).order_by(Ticket.id)))
    assert groups == ["Orders", "Orders"]


def test_same_file_twice_in_one_mail_is_one_blob(settings: Settings, clock: Any) -> None:
    app = App(settings, clock=clock)
    msg = EmailMessage()
    msg["From"] = "dana@users.test"
    msg["To"] = "help@helpdesk.test"
    msg["Subject"] = "twice"
    msg.set_content("two copies attached")
    for name in ("a.txt", "b.txt"):
        msg.add_attachment(b"same bytes", maintype="text", subtype="plain", filename=name)
    result = app.intake.ingest_now(inbound(msg.as_bytes(), clock.now))
    assert result.outcome.value == "created"
    with app.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Blob)) == 1
        assert s.scalar(select(func.count()).select_from(Attachment)) == 2
    app.engine.dispose()


def test_mail_without_message_id_dedups_by_channel_id(settings: Settings, clock: Any) -> None:
    app = App(settings, clock=clock)
    raw = make_mail("From a cron job", message_id=None)
    first = Inbound(Channel.EMAIL, raw, clock.now, "imap:help", None, ("help@helpdesk.test",),
                    channel_message_id="imap:help:1700000000:42")
    again = Inbound(Channel.EMAIL, raw, clock.now, "imap:help", None, ("help@helpdesk.test",),
                    channel_message_id="imap:help:1700000000:42")
    other = Inbound(Channel.EMAIL, raw, clock.now, "smtp", "cron@users.test",
                    ("help@helpdesk.test",))
    assert app.intake.ingest_now(first).outcome.value == "created"
    assert app.intake.ingest_now(again).outcome.value == "duplicate"
    # Without any id, identical script mail is two tickets (B5: an ordinary ticket each).
    assert app.intake.ingest_now(other).outcome.value == "created"
    assert app.intake.ingest_now(other).outcome.value == "created"
    app.engine.dispose()


async def test_intake_batches_are_bounded_by_size(settings: Settings, clock: Any) -> None:
    import asyncio

    app = App(settings, clock=clock)
    batches: list[int] = []
    app.intake.on_commit = lambda results: batches.append(len(results))
    app.intake.batch_bytes = 1  # any message fills a batch: one transaction each
    app.intake.start()
    results = await asyncio.gather(*(app.intake.submit(inbound(make_mail(f"m{i}"), clock.now))
                                     for i in range(5)))
    await app.intake.stop()
    assert [r.outcome.value for r in results] == ["created"] * 5
    assert batches == [1, 1, 1, 1, 1]
    app.engine.dispose()


async def test_intake_refuses_work_once_stopping(settings: Settings, clock: Any) -> None:
    import pytest

    from gateway.intake import StoreUnavailable

    app = App(settings, clock=clock)
    app.intake.start()
    await app.intake.stop()
    with pytest.raises(StoreUnavailable):
        await app.intake.submit(inbound(make_mail("late"), clock.now))
    app.engine.dispose()


def test_migrations_give_exactly_the_models_schema(db_url: str) -> None:
    """Every branch upgraded ("heads"): no table, column or index differs from the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(db_url)
    migrate(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def test_the_automatic_mail_count_reads_only_the_index(tmp_path: Any) -> None:
    """The per-address cap is asked for every acknowledgement: it must not read the
    outbox rows themselves (their composed mail lies before `automatic`). The plan
    checked is SQLite's, the embedded default; PostgreSQL plans by its statistics."""
    from gateway.notify import _AUTO_MAIL_COUNT

    engine = make_engine(f"sqlite:///{tmp_path / 'plan.sqlite3'}")
    migrate(engine)
    with engine.connect() as conn:
        sql = str(_AUTO_MAIL_COUNT.compile(engine))
        plan = " ".join(str(row[3]) for row in conn.exec_driver_sql(
            f"EXPLAIN QUERY PLAN {sql}", ("dana@users.test", "2026-11-27 00:00:00")))
    assert "COVERING INDEX ix_outbox_rate" in plan
    engine.dispose()


def _sqlite_sessions(tmp_path: Any) -> tuple[Any, Any]:
    engine = make_engine(f"sqlite:///{tmp_path / 'queue.sqlite3'}")
    migrate(engine)
    return engine, make_sessionmaker(engine)


def test_sqlite_writers_of_one_process_queue_in_process(tmp_path: Any, monkeypatch: Any) -> None:
    """A second transaction waits on the daemon's own queue, never in SQLite's busy handler.

    SQLite's handler sleeps in steps up to 100 ms and wakes late; the queue wakes the
    next writer at the commit. With the first transaction open, the second one's
    wait ends with the queue's error, so it never reached SQLite's lock.
    """
    import gateway.store.db as db

    monkeypatch.setattr(db, "BUSY_TIMEOUT_S", 0.05)
    engine, sessions = _sqlite_sessions(tmp_path)
    with sessions() as first, first.begin():
        first.execute(select(func.count(Ticket.id)))
        with sessions() as second:
            try:
                second.execute(select(func.count(Ticket.id)))
            except Exception as exc:
                assert "in-process writer queue" in str(exc)
            else:
                raise AssertionError("the second transaction ran beside the first")
    with sessions() as third, third.begin():  # the queue was released by both
        third.execute(select(func.count(Ticket.id)))
    engine.dispose()


def test_sqlite_queued_writer_proceeds_when_the_first_commits(tmp_path: Any) -> None:
    """The waiter runs as soon as the holder commits, even with SQLite's own wait off."""
    engine, sessions = _sqlite_sessions(tmp_path)
    engine.dispose()  # new connections, each with SQLite's busy wait off
    event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA busy_timeout=0"))
    now = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)
    started, numbers = threading.Event(), []

    def second() -> None:
        started.set()
        with sessions() as s, s.begin():
            numbers.append(next_ticket_number(s, now))

    with sessions() as first, first.begin():
        numbers.append(next_ticket_number(first, now))
        waiter = threading.Thread(target=second)
        waiter.start()
        started.wait()
    waiter.join()
    assert numbers == ["2026112700001", "2026112700002"]
    engine.dispose()
