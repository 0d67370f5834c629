"""Accept first under a burst: SMTP answers 250 from the spool, the tickets follow.

When a queue has formed at the intake writer (four or more waiting for one
batch), SMTP messages are committed to the spool as raw bytes and answered
"250 ... queued"; the writer makes their tickets when the burst has passed, in
the order they came, and deletes each spool row in the transaction that stores
the result. Other channels, and one message at a time, never wait in the spool.

A burst is made without timing: the writer is held as it takes the first
message (a gate before it gathers a batch) while more messages queue behind
it, so they all make one batch; where the load it sees matters (when it turns
to the spool), it is raised with `note_busy`, as a long batch would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError
from support.app import demo_config
from support.mailer import make_mail, send
from support.sink import SmtpSink

from gateway import intake as intake_module
from gateway.config import Settings, parse_settings
from gateway.daemon import App
from gateway.intake import _STOP, LOAD_TAU, Intake, StoreUnavailable, _Job
from gateway.mail.transport import SmtpTransport
from gateway.message import Channel, Inbound
from gateway.outbox import SATURATED
from gateway.pipeline import Outcome
from gateway.store import spool
from gateway.store.models import Article, OutboxRow, QuarantineRow, SpoolRow, Ticket


def smtp_port(app: App) -> int:
    return app.channels[0].port  # type: ignore[attr-defined,no-any-return]


def count(app: App, model: Any, *where: Any) -> int:
    with app.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def mail_in(raw: bytes, mail_from: str | None = "dana@users.test") -> Inbound:
    return Inbound(Channel.EMAIL, raw, dt.datetime.now(dt.UTC), "smtp", mail_from,
                   ("help@helpdesk.test",))


def saturate(app: App) -> None:
    """As if the writer had just spent a whole second on one batch."""
    now = time.monotonic()
    app.intake.note_busy(now - 1.0, now)


class Gate:
    """Holds the intake writer, once it has taken a message, before it gathers what
    else waits into the batch, until `open()`."""

    def __init__(self, app: App, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        gather = app.intake._gather

        def gated(first: object) -> Any:
            if not self.released.is_set():
                self.entered.set()
                self.released.wait(30)
            return gather(first)

        monkeypatch.setattr(app.intake, "_gather", gated)

    async def held(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30), "the writer never started"

    def open(self) -> None:
        self.released.set()


async def queued_behind(app: App, n: int) -> None:
    """Until `n` messages wait in the writer's queue (behind the held batch)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while app.intake._queue.qsize() < n:
        assert loop.time() < deadline, f"{n} messages never reached the intake"
        await asyncio.sleep(0.01)


async def burst(app: App, monkeypatch: pytest.MonkeyPatch,
                first: Callable[[], Awaitable[Any]],
                behind: list[Callable[[], Awaitable[Any]]],
                saturated: bool = True) -> tuple[Any, list[Any]]:
    """The writer takes `first` and is held; `behind` queue up meanwhile, in their
    order; then the writer (`saturated`: as after a long batch) takes them all as one
    batch."""
    gate = Gate(app, monkeypatch)
    head = asyncio.ensure_future(first())
    await gate.held()
    rest = []
    for i, job in enumerate(behind, 1):  # one at a time: their order is the queue's
        rest.append(asyncio.ensure_future(job()))
        await queued_behind(app, i)
    if saturated:
        saturate(app)
    gate.open()
    return await head, list(await asyncio.gather(*rest))


async def test_a_burst_is_answered_from_the_spool_and_its_tickets_follow_in_order(
        app: App, sink: SmtpSink, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.intake")
    port = smtp_port(app)
    question = make_mail("Entry missing", message_id="<q1@users.test>")
    more = make_mail("More detail", sender="Dana User <dana@users.test>",
                     in_reply_to="<q1@users.test>", references="<q1@users.test>")
    other = make_mail("Cannot log in", sender="Eve <eve@users.test>")
    head, rest = await burst(app, monkeypatch, lambda: send(port, make_mail("First")), [
        lambda: send(port, question),
        lambda: send(port, more),
        lambda: send(port, other, mail_from="eve@users.test"),
    ])
    assert [head, *rest] == [(250, "2.0.0 OK queued")] * 4
    # Committed before the 250: the four are in the spool or already through it.
    await app.intake.spool_drained()
    assert count(app, SpoolRow) == 0
    assert count(app, Ticket) == 3  # First, the question (with its follow-up), Eve's
    with app.sessions() as s:
        asked = s.scalar(select(Ticket).where(Ticket.subject == "Entry missing"))
        assert asked is not None
        subjects = list(s.scalars(select(Article.subject).where(
            Article.ticket_id == asked.id).order_by(Article.id)))
    # The follow-up came after its question and found the ticket the question made.
    assert subjects == ["Entry missing", "More detail"]
    # Its one log line, once its ticket exists: Message-ID, outcome, ticket number.
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"smtp: message q1@users.test -> created ticket {asked.number}" in lines
    assert not any("queued" in line for line in lines)
    # Each new ticket got its acknowledgement and its agent's notification, and the
    # follow-up its notification (First Line has one agent).
    assert count(app, OutboxRow) == 3 * 2 + 1


async def test_one_message_at_a_time_is_never_spooled(app: App) -> None:
    saturate(app)
    code, reply = await send(smtp_port(app), make_mail("Alone"))
    assert code == 250 and "created" in reply
    assert count(app, Ticket) == 1


async def test_three_waiting_are_no_burst_however_busy_the_writer(
        app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """A steady, heavy load (a few messages per batch): spooling would only put a drain
    batch in front of each arrival."""
    _, rest = await burst(app, monkeypatch, lambda: app.accept(mail_in(make_mail("a"))), [
        lambda: app.accept(mail_in(make_mail("b"))),
        lambda: app.accept(mail_in(make_mail("c"))),
    ])
    assert [r.outcome for r in rest] == [Outcome.CREATED] * 2


async def test_four_waiting_at_once_are_a_burst(
        app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst's first batches: the queue is there before the load measure has seen it."""
    _, rest = await burst(app, monkeypatch, lambda: app.accept(mail_in(make_mail("a"))), [
        (lambda n=n: app.accept(mail_in(make_mail(n)))) for n in "bcde"
    ], saturated=False)
    assert [r.outcome for r in rest] == [Outcome.QUEUED] * 4
    await app.intake.spool_drained()
    assert count(app, Ticket) == 5


async def test_other_channels_are_never_spooled(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    # IMAP, Telegram and the web form acknowledge with what the pipeline made (the web
    # form answers with the ticket number): they always wait for it.
    head, rest = await burst(app, monkeypatch, lambda: app.submit(mail_in(make_mail("a"))), [
        lambda: app.submit(mail_in(make_mail("b"))),
        lambda: app.submit(mail_in(make_mail("c"))),
    ])
    assert [r.outcome for r in [head, *rest]] == [Outcome.CREATED] * 3
    assert app.intake.spooled() == 0


async def test_a_new_message_waits_behind_the_spool(
        app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once anything is spooled, SMTP mail joins the spool behind it even in a lull, so
    a follow-up is never processed before its question."""
    # Nothing is spooled, and the writer is busy: a message alone runs at once.
    saturate(app)
    assert (await app.accept(mail_in(make_mail("a")))).outcome == Outcome.CREATED
    # Once anything is spooled, a message alone joins the spool behind it.
    gate = Gate(app, monkeypatch)
    head = asyncio.ensure_future(app.accept(mail_in(make_mail("d"))))
    await gate.held()
    with app.sessions() as s, s.begin():  # one still waits there
        spool.put(s, [mail_in(make_mail("waiting"))])
    app.intake._spool_added(1, time.monotonic())
    gate.open()
    assert (await head).outcome == Outcome.QUEUED
    await app.intake.spool_drained()
    with app.sessions() as s:
        subjects = list(s.scalars(select(Ticket.subject).order_by(Ticket.id)))
    assert subjects[-2:] == ["waiting", "d"]


async def attempt(port: int, raw: bytes) -> tuple[int, str]:
    """`send`, with a refused DATA as its (code, text) instead of an exception."""
    try:
        return await send(port, raw)
    except aiosmtplib.SMTPDataError as exc:
        return exc.code, exc.message


async def test_store_failure_while_spooling_is_answered_451(
        app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    port = smtp_port(app)
    with app.engine.begin() as c:
        c.execute(text("ALTER TABLE spool RENAME TO spool_away"))
    try:
        head, rest = await burst(app, monkeypatch, lambda: attempt(port, make_mail("a")), [
            (lambda n=n: attempt(port, make_mail(n))) for n in "bcd"
        ])
    finally:
        with app.engine.begin() as c:
            c.execute(text("ALTER TABLE spool_away RENAME TO spool"))
    # The sender keeps the messages and tries again: nothing was acknowledged.
    assert [code for code, _ in [head, *rest]] == [451] * 4
    assert count(app, Ticket) == 0


@asynccontextmanager
async def running(settings: Settings, sink: SmtpSink) -> AsyncIterator[App]:
    transport = SmtpTransport("127.0.0.1", sink.port, starttls=False, username="",
                              password="", timeout=5)
    app = App(settings, transport=transport)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def test_burst_queue_seconds_0_answers_every_message_with_its_ticket(
        tmp_path: Path, db_url: str, sink: SmtpSink, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse_settings(demo_config(tmp_path, db_url, smtp={"burst_queue_seconds": 0}),
                              base_dir=tmp_path, environ={})
    async with running(settings, sink) as app:
        _, rest = await burst(app, monkeypatch, lambda: app.accept(mail_in(make_mail("a"))), [
            lambda: app.accept(mail_in(make_mail("b"))),
            lambda: app.accept(mail_in(make_mail("c"))),
        ])
        assert [r.outcome for r in rest] == [Outcome.CREATED] * 2


async def test_what_a_stopped_daemon_left_in_the_spool_is_processed_at_the_next_start(
        settings: Settings, sink: SmtpSink) -> None:
    """A crash (or a stop) after the 250 and before the ticket: the rows wait on disk,
    and the next start makes their tickets before anything else."""
    first = App(settings)
    with first.sessions() as s, s.begin():
        spool.put(s, [mail_in(make_mail("Left behind")),
                      mail_in(make_mail("Who am I", sender=""), mail_from=None)])
    first.engine.dispose()
    async with running(settings, sink) as app:
        await app.intake.spool_drained()
        assert count(app, SpoolRow) == 0
        assert count(app, Ticket, Ticket.subject == "Left behind") == 1
        # A message the pipeline refuses is quarantined with its bytes, not lost.
        with app.sessions() as s:
            held = s.scalars(select(QuarantineRow)).all()
        assert len(held) == 1 and b"Who am I" in held[0].raw
        assert held[0].source == "smtp"


def test_a_claim_rolled_back_leaves_the_spool_as_it_was(app: App) -> None:
    with app.sessions() as s, s.begin():
        spool.put(s, [mail_in(make_mail("one")), mail_in(make_mail("two"))])
    with app.sessions() as s:
        ids = spool.next_batch(s, 16, 1 << 20)
    assert len(ids) == 2
    with app.sessions() as s:
        s.begin()
        claimed = spool.claim(s, ids)
        assert [b"Subject: one" in m.raw for m in claimed] == [True, False]
        assert claimed[0].rcpt_tos == ("help@helpdesk.test",)
        assert claimed[0].mail_from == "dana@users.test"
        s.rollback()  # the pipeline failed: nothing of the batch is stored
    assert count(app, SpoolRow) == 2
    with app.sessions() as s, s.begin():
        assert len(spool.claim(s, ids)) == 2
    assert count(app, SpoolRow) == 0


def test_a_drain_batch_is_bounded_by_size(app: App) -> None:
    big = make_mail("big", body="x" * 5000 + "\n")
    with app.sessions() as s, s.begin():
        spool.put(s, [mail_in(big)] * 3)
    with app.sessions() as s:
        assert len(spool.next_batch(s, 16, 12_000)) == 2
        assert len(spool.next_batch(s, 16, 100)) == 1  # the first alone, however large
        assert len(spool.next_batch(s, 2, 1 << 20)) == 2


def waiting(intake: Intake, now: float) -> float | None:
    """How long the writer would wait for arrivals before turning to the spool."""
    return intake._wait(now)


def idle_intake(app: App) -> Intake:
    """An intake whose writer is not running: its decisions, step by step."""
    return Intake(app.pipeline, app.sessions, spool_seconds=10)


def test_the_writer_turns_to_the_spool_once_arrivals_would_not_saturate_it(app: App) -> None:
    intake = idle_intake(app)
    now = 1000.0
    assert waiting(intake, now) is None  # nothing spooled: wait for arrivals
    intake._spool_added(10, now)
    intake._demand.add(now, 4 * LOAD_TAU)  # arrivals worth four times the writer
    wait = waiting(intake, now)
    assert wait is not None and wait > 0
    # Exactly when the decaying demand falls to the saturation mark.
    assert intake._demand.at(now + wait) / LOAD_TAU == pytest.approx(SATURATED, rel=0.01)
    assert waiting(intake, now + wait) == 0.0


def test_an_overdue_spool_is_drained_even_under_a_burst(app: App) -> None:
    intake = idle_intake(app)
    now = 1000.0
    intake._spool_added(10, now)
    intake._demand.add(now + intake.spool_seconds, 100 * LOAD_TAU)  # still a burst
    assert waiting(intake, now + intake.spool_seconds) == 0.0


def test_rows_another_daemon_spooled_do_not_strand_this_ones(
        app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two daemons on one database: both drains pick the other's (older) batch, the other
    claims it first, and this writer's claim finds nothing. Its own rows, behind, are
    still there and must still be drained."""
    intake = idle_intake(app)
    with app.sessions() as s, s.begin():  # the other daemon's, older
        spool.put(s, [mail_in(make_mail(f"theirs {i}")) for i in range(8)])
    with app.sessions() as s, s.begin():  # this daemon's
        spool.put(s, [mail_in(make_mail(f"ours {i}")) for i in range(8)])
    intake._spool_added(8, time.monotonic())
    next_batch, claim = spool.next_batch, spool.claim

    def raced(session: Any, limit: int, max_bytes: int) -> list[int]:
        ids = next_batch(session, limit, max_bytes)
        monkeypatch.setattr(spool, "next_batch", next_batch)
        session.rollback()  # the look is over (on SQLite it holds the write lock)
        with app.sessions() as other, other.begin():  # the other daemon's drain
            claim(other, ids)
        return ids

    monkeypatch.setattr(spool, "next_batch", raced)
    for _ in range(5):
        if not intake.spooled():
            break
        intake._drain()
    assert count(app, SpoolRow) == 0
    assert count(app, Ticket, Ticket.subject.like("ours%")) == 8


async def test_what_an_earlier_run_left_is_processed_though_the_count_at_start_failed(
        settings: Settings, sink: SmtpSink, monkeypatch: pytest.MonkeyPatch) -> None:
    first = App(settings)
    with first.sessions() as s, s.begin():
        spool.put(s, [mail_in(make_mail("Left behind"))])
    first.engine.dispose()
    count_spool = spool.count

    def fails_once(session: Any) -> int:
        monkeypatch.setattr(spool, "count", count_spool)
        raise RuntimeError("the database went away")

    monkeypatch.setattr(spool, "count", fails_once)
    async with running(settings, sink) as app:
        await app.intake.spool_drained()
        assert count(app, SpoolRow) == 0
        await app.accept(mail_in(make_mail("Later")))
        with app.sessions() as s:
            subjects = list(s.scalars(select(Ticket.subject).order_by(Ticket.id)))
        assert subjects == ["Left behind", "Later"]


async def test_with_burst_queue_seconds_0_what_an_earlier_run_spooled_still_goes_first(
        app: App) -> None:
    """Nothing new is spooled, but a follow-up must not overtake its question, left in
    the spool by a run that had the spool on."""
    intake = Intake(app.pipeline, app.sessions, spool_seconds=0)
    with app.sessions() as s, s.begin():
        spool.put(s, [mail_in(make_mail("Entry missing", message_id="<q1@users.test>"))])
    intake._spool_added(1, -math.inf)  # as the writer counts it at start
    loop = asyncio.get_running_loop()
    follow_up = make_mail("More detail", in_reply_to="<q1@users.test>",
                          references="<q1@users.test>")
    job = _Job(mail_in(follow_up), loop.create_future(), loop, deferrable=True)
    await asyncio.to_thread(intake._take, [job])
    assert (await job.future).outcome == Outcome.FOLLOWUP
    assert count(app, SpoolRow) == 0
    assert count(app, Ticket) == 1


async def test_an_overdue_spool_does_not_grow_under_a_storm(app: App) -> None:
    """Once the oldest spooled message is overdue, each batch of arrivals is matched by
    as many drained: with twenty senders each waiting for its 250, a batch of arrivals
    is twenty messages, and draining eight per batch let the spool, and the delay of
    every ticket, grow for as long as the storm lasted."""
    intake = idle_intake(app)
    with app.sessions() as s, s.begin():
        spool.put(s, [mail_in(make_mail(f"old {i}")) for i in range(24)])
    loop = asyncio.get_running_loop()
    jobs = [_Job(mail_in(make_mail(f"new {i}")), loop.create_future(), loop, deferrable=True)
            for i in range(20)]
    for job in jobs:
        intake._queue.put(job)
    intake._queue.put(_STOP)
    await asyncio.to_thread(intake._run)  # counts the 24 (overdue), takes the 20, stops
    assert [(await j).outcome for j in [job.future for job in jobs]] == [Outcome.QUEUED] * 20
    assert count(app, SpoolRow) <= 24


async def test_one_message_the_store_cannot_take_does_not_hold_up_the_rest(
        settings: Settings, sink: SmtpSink, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spooled message whose batch cannot be committed at all (here: its own
    quarantine fails) is tried alone, and after POISON_TRIES failures quarantined as it
    is; the messages before and after it get their tickets."""
    monkeypatch.setattr(intake_module, "SPOOL_RETRY_S", 0.01)
    first = App(settings)
    with first.sessions() as s, s.begin():
        spool.put(s, [mail_in(make_mail("before")), mail_in(make_mail("poison")),
                      mail_in(make_mail("after"))])
    first.engine.dispose()
    app = App(settings, transport=SmtpTransport("127.0.0.1", sink.port, starttls=False,
                                                username="", password="", timeout=5))
    one = app.intake._one
    tries = []

    def failing(session: Any, inbound: Inbound, now: dt.datetime) -> Any:
        if b"Subject: poison" in inbound.raw:
            tries.append(1)
            raise RuntimeError("cannot store this one")
        return one(session, inbound, now)

    original = app.pipeline.ingest

    def refusing(session: Any, inbound: Inbound, *args: Any) -> Any:
        if b"Subject: poison" in inbound.raw:
            raise RuntimeError("refused")  # the fast path gives the batch up
        return original(session, inbound, *args)

    monkeypatch.setattr(app.intake, "_one", failing)
    monkeypatch.setattr(app.pipeline, "ingest", refusing)
    await app.start()
    try:
        await app.intake.spool_drained()
    finally:
        await app.stop()
    with app.sessions() as s:
        subjects = list(s.scalars(select(Ticket.subject).order_by(Ticket.id)))
        held = s.scalars(select(QuarantineRow)).all()
    assert subjects == ["before", "after"]
    assert len(held) == 1 and b"Subject: poison" in held[0].raw
    assert held[0].stage == "spool" and "cannot store this one" in held[0].detail
    assert len(tries) == intake_module.POISON_TRIES + 1  # its batch, then alone
    assert count(app, SpoolRow) == 0


async def test_a_message_submitted_in_the_turn_stop_begins_is_answered(app: App) -> None:
    """Submissions reach the writer once per turn of the loop; stop() must hand over
    what this turn collected before its stop marker, or that message is never
    answered (its SMTP client would wait for ever)."""
    task = asyncio.ensure_future(app.submit(mail_in(make_mail("last one"))))
    await asyncio.sleep(0)  # the task has submitted; the hand-over is still to come
    await app.intake.stop()
    async with asyncio.timeout(10):
        assert (await task).outcome == Outcome.CREATED


def test_drains_that_failed_before_taking_a_message_do_not_count_as_its_tries(
        app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the store is down the look for spooled messages fails: those drains tried
    no message, so they must not count towards POISON_TRIES. Once the store is back, a
    message whose first drain fails (the store flapped once more) is tried again, not
    quarantined at once as if it had failed three times."""
    intake = idle_intake(app)
    with app.sessions() as s, s.begin():
        spool.put(s, [mail_in(make_mail("fine"))])
    intake._spool_added(1, -math.inf)
    next_batch = spool.next_batch

    def down(session: Any, limit: int, max_bytes: int) -> list[int]:
        raise RuntimeError("connection refused")

    monkeypatch.setattr(spool, "next_batch", down)
    for _ in range(intake_module.POISON_TRIES):
        intake._drain()
    monkeypatch.setattr(spool, "next_batch", next_batch)
    process = intake._process

    def flaps_once(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(intake, "_process", process)
        raise RuntimeError("server closed the connection unexpectedly")

    monkeypatch.setattr(intake, "_process", flaps_once)
    intake._drain()  # its first try fails
    assert count(app, QuarantineRow) == 0
    intake._drain()
    assert count(app, QuarantineRow) == 0
    assert count(app, Ticket, Ticket.subject == "fine") == 1
    assert count(app, SpoolRow) == 0


async def test_a_message_submitted_on_another_loop_as_stop_begins_is_answered(
        app: App) -> None:
    """Jobs carry their loop: the intake serves several. A message another loop (on
    another thread) submitted in the turn stop() begins reaches the writer after the
    stop marker (that loop hands it over at the end of its turn): it must be answered
    all the same, not left waiting for ever."""
    other = asyncio.new_event_loop()
    holder: list[asyncio.Task[Any]] = []

    def first_turn() -> None:
        holder.append(other.create_task(app.intake.submit(mail_in(make_mail("elsewhere")))))
        other.call_soon(other.stop)
        other.run_forever()  # one turn: submitted, the hand-over still to come

    def the_rest() -> None:
        other.call_later(10, other.stop)
        holder[0].add_done_callback(lambda _: other.stop())
        other.run_forever()  # the hand-over, then the answer (or 10 s)

    try:
        await asyncio.to_thread(first_turn)
        task = holder[0]
        assert not task.done()
        await app.intake.stop()
        await asyncio.to_thread(the_rest)
        assert task.done(), "never answered"
        error = task.exception()
        assert isinstance(error, intake_module.StoreUnavailable) or (
            error is None and task.result().outcome == Outcome.CREATED)
    finally:
        def close() -> None:
            if holder and not holder[0].done():
                holder[0].cancel()
                other.run_until_complete(asyncio.gather(holder[0], return_exceptions=True))
            other.close()

        await asyncio.to_thread(close)


def store_down() -> OperationalError:
    return OperationalError("INSERT INTO tickets ...", {}, Exception("disk I/O error"))


async def test_a_store_failure_is_no_reason_to_quarantine_a_message(
        app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store failing under a message (a lost connection, a timeout, a full disk)
    fails its batch: the sender is answered 451 and retries; it is not quarantined."""
    original = app.pipeline.ingest

    def failing(session: Any, inbound: Inbound, *args: Any) -> Any:
        if b"Subject: unlucky" in inbound.raw:
            raise store_down()
        return original(session, inbound, *args)

    monkeypatch.setattr(app.pipeline, "ingest", failing)
    with pytest.raises(StoreUnavailable):
        await app.accept(mail_in(make_mail("unlucky")))
    assert count(app, QuarantineRow) == 0


async def test_store_failures_while_draining_are_no_message_s_tries(
        settings: Settings, sink: SmtpSink, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spooled message whose drains fail because the store does, more than
    POISON_TRIES times, gets its ticket once the store is back."""
    monkeypatch.setattr(intake_module, "SPOOL_RETRY_S", 0.01)
    first = App(settings)
    with first.sessions() as s, s.begin():
        spool.put(s, [mail_in(make_mail("patient"))])
    first.engine.dispose()
    app = App(settings, transport=SmtpTransport("127.0.0.1", sink.port, starttls=False,
                                                username="", password="", timeout=5))
    original = app.pipeline.ingest
    failures = []

    def flaky(session: Any, inbound: Inbound, *args: Any) -> Any:
        if len(failures) < 2 * (intake_module.POISON_TRIES + 1):  # fast and safe path
            failures.append(1)
            raise store_down()
        return original(session, inbound, *args)

    monkeypatch.setattr(app.pipeline, "ingest", flaky)
    await app.start()
    try:
        await app.intake.spool_drained()
    finally:
        await app.stop()
    assert count(app, Ticket, Ticket.subject == "patient") == 1
    assert count(app, QuarantineRow) == 0
