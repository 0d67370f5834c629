"""The durable outbox: retries with backoff, the dead state, held rows, no resend on restart."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from support.mailer import make_mail, send
from support.sink import SmtpSink

from gateway.config import Settings
from gateway.daemon import App
from gateway.intake import Intake
from gateway.mail.transport import SmtpTransport
from gateway.outbox import OutboxWorker, backoff
from gateway.store.models import OutboxRow


def port(app: App) -> int:
    return app.channels[0].port  # type: ignore[attr-defined,no-any-return]


@pytest.fixture
async def app(settings: Settings, sink: SmtpSink, clock: Any) -> AsyncIterator[App]:
    """A daemon whose outbox is drained only by the test, so each attempt is observable."""
    transport = SmtpTransport("127.0.0.1", sink.port, starttls=False, username="",
                              password="", timeout=5)
    application = App(settings, clock=clock, transport=transport, run_outbox=False)
    await application.start()
    yield application
    await application.stop()


def outbox(app: App) -> list[OutboxRow]:
    with app.sessions() as s:
        return list(s.scalars(select(OutboxRow).order_by(OutboxRow.id)))


async def test_temporary_failure_is_retried_after_backoff(
    app: App, sink: SmtpSink, clock: Any
) -> None:
    sink.fail_next(2, 451)  # the ack and the notification both fail once
    await send(port(app), make_mail("Retry me"))
    assert app.outbox is not None
    await app.outbox.drain()
    rows = outbox(app)
    assert [r.state for r in rows] == ["pending", "pending"]
    assert all(r.attempts == 1 and r.last_error and "451" in r.last_error for r in rows)
    assert all(r.next_attempt_at > clock.now for r in rows)
    assert sink.messages == []
    # Not due yet: nothing is attempted.
    assert await app.outbox.drain() == 0
    clock.advance(seconds=app.settings.outbound.backoff_seconds * 1.3)
    await app.outbox.drain()
    await sink.wait_for(2)
    assert [r.state for r in outbox(app)] == ["sent", "sent"]
    assert [r.attempts for r in outbox(app)] == [2, 2]


async def test_permanent_failure_is_dead_at_once(app: App, sink: SmtpSink) -> None:
    sink.refuse("dana@users.test", 550)
    await send(port(app), make_mail("Nobody home"))
    assert app.outbox is not None
    await app.outbox.drain()
    await sink.wait_for(1)  # the agent's notification still goes out
    ack, note = outbox(app)
    assert (ack.kind, ack.state, ack.attempts) == ("ack", "dead", 1)
    assert ack.last_error is not None and "550" in ack.last_error
    assert note.state == "sent"


async def test_dead_after_max_attempts(app: App, sink: SmtpSink, clock: Any) -> None:
    sink.fail_next(100, 421, stage="mail")
    await send(port(app), make_mail("Flaky smarthost"))
    assert app.outbox is not None
    for _ in range(app.settings.outbound.max_attempts):
        await app.outbox.drain()
        clock.advance(seconds=app.settings.outbound.backoff_max_seconds * 1.3)
    rows = outbox(app)
    assert {r.state for r in rows} == {"dead"}
    assert {r.attempts for r in rows} == {app.settings.outbound.max_attempts}


def test_backoff_grows_and_is_capped(settings: Settings) -> None:
    o = settings.outbound
    first, third = backoff(o, 1), backoff(o, 3)
    assert 0.8 * o.backoff_seconds <= first.total_seconds() <= 1.2 * o.backoff_seconds
    assert 3.2 * o.backoff_seconds <= third.total_seconds() <= 4.8 * o.backoff_seconds
    assert backoff(o, 60).total_seconds() <= o.backoff_max_seconds
    # max_attempts has no upper bound; 2.0 ** 1024 would overflow a float.
    assert backoff(o, 5000).total_seconds() <= o.backoff_max_seconds


async def test_results_of_a_round_survive_a_failed_recording(
    app: App, sink: SmtpSink, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transaction that records a round fails (the store is briefly unavailable):
    the results stay with the worker and the next round records them, so nothing sent
    is sent again when its claim runs out."""
    await send(port(app), make_mail("Record me"))
    assert app.outbox is not None
    worker = app.outbox
    real_record = worker._record
    failures = iter([OperationalError("UPDATE outbox", {}, Exception("database is locked"))])

    def record_failing_once(*args: Any) -> Any:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real_record(*args)

    monkeypatch.setattr(worker, "_record", record_failing_once)
    with pytest.raises(OperationalError):
        await worker.drain()
    await sink.wait_for(2)
    assert [r.state for r in outbox(app)] == ["pending", "pending"]  # claimed, unrecorded
    assert await worker.drain() == 0  # records the results; nothing else is due
    assert [(r.state, r.attempts) for r in outbox(app)] == [("sent", 1), ("sent", 1)]
    clock.advance(minutes=10)  # past the claim's lease
    assert await worker.drain() == 0
    assert len(sink.messages) == 2


async def test_no_resend_after_restart(
    settings: Settings, sink: SmtpSink, clock: Any
) -> None:
    def transport() -> SmtpTransport:
        return SmtpTransport("127.0.0.1", sink.port, starttls=False, username="",
                             password="", timeout=5)

    first = App(settings, clock=clock, transport=transport())
    await first.start()
    await send(first.channels[0].port, make_mail("Before restart"))  # type: ignore[attr-defined]
    await sink.wait_for(2)
    await first.stop()
    second = App(settings, clock=clock, transport=transport())
    await second.start()
    assert second.outbox is not None
    assert await second.outbox.drain() == 0
    await second.stop()
    assert len(sink.messages) == 2


async def test_rows_committed_before_a_crash_are_sent_after_restart(
    settings: Settings, sink: SmtpSink, clock: Any
) -> None:
    # The intake committed (so SMTP said 250) but the daemon died before delivering.
    app = App(settings, clock=clock)
    from gateway.message import Channel, Inbound

    app.intake.ingest_now(Inbound(Channel.EMAIL, make_mail("Crash"), clock.now, "test",
                                  "dana@users.test", ("help@helpdesk.test",)))
    app.engine.dispose()
    restarted = App(settings, clock=clock, transport=SmtpTransport(
        "127.0.0.1", sink.port, starttls=False, username="", password="", timeout=5))
    await restarted.start()
    await sink.wait_for(2)
    await restarted.stop()
    assert {m.rcpt_tos[0] for m in sink.messages} == {"dana@users.test", "alice@agents.test"}


async def test_rows_without_a_sender_are_held(app: App, clock: Any) -> None:
    with app.sessions() as s, s.begin():
        s.add(OutboxRow(channel="pigeon", kind="relay", to_address="x", recipients=["x"],
                        envelope_from="help@helpdesk.test", state="pending",
                        next_attempt_at=clock.now, created_at=clock.now,
                        payload={"text": "hi"}))
    assert app.outbox is not None
    await app.outbox.drain()
    [row] = outbox(app)
    assert row.state == "held" and row.last_error and "pigeon" in row.last_error


async def test_maildir_is_the_default_without_smarthost(settings: Settings, clock: Any) -> None:
    app = App(settings, clock=clock)
    await app.start()
    from gateway.message import Channel, Inbound

    await app.submit(Inbound(Channel.EMAIL, make_mail("To maildir"), clock.now, "test",
                             "dana@users.test", ("help@helpdesk.test",)))
    assert app.outbox is not None
    await app.outbox.drain()
    await app.stop()
    new = settings.path(settings.outbound.maildir) / "new"
    files = sorted(new.iterdir())
    assert len(files) == 2
    assert all(b"[Ticket#" in f.read_bytes() for f in files)



class Load:
    """A stand-in for the intake writer's load, and a monotonic clock, set by the test."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.now = 0.0
        self.asked = asyncio.Event()

    def load(self) -> float:
        self.asked.set()
        return self.value

    def monotonic(self) -> float:
        return self.now


def holding(app: App, load: Load) -> OutboxWorker:
    worker = app.outbox
    assert worker is not None
    worker.intake_load, worker.monotonic = load.load, load.monotonic
    return worker


@contextlib.asynccontextmanager
async def running(worker: OutboxWorker) -> AsyncIterator[None]:
    """The worker's own loop, as the daemon runs it, for the length of the block."""
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        worker.stop()
        await task


async def test_deliveries_wait_while_the_intake_is_saturated(app: App, sink: SmtpSink) -> None:
    load = Load(1.0)
    worker = holding(app, load)
    await send(port(app), make_mail("Burst"))
    async with running(worker):
        # Twice round the loop: each time it found the intake saturated and held back.
        for _ in range(2):
            load.asked.clear()
            await load.asked.wait()
        assert sink.messages == []
        assert [r.state for r in outbox(app)] == ["pending", "pending"]
        load.value = 0.3  # the burst is over
        await sink.wait_for(2)
    assert [r.state for r in outbox(app)] == ["sent", "sent"]


async def test_deliveries_wait_no_longer_than_the_hold(app: App, sink: SmtpSink) -> None:
    load = Load(1.0)
    worker = holding(app, load)
    await send(port(app), make_mail("Long burst"))
    async with running(worker):
        await load.asked.wait()
        assert sink.messages == []
        load.now = app.settings.outbound.burst_hold_seconds + 0.1  # still saturated
        await sink.wait_for(2)


async def test_the_hold_starts_again_only_once_the_backlog_is_delivered(
    app: App, sink: SmtpSink
) -> None:
    load = Load(1.0)
    worker = holding(app, load)
    limit = app.settings.outbound.burst_hold_seconds
    assert worker.hold_left() == limit
    load.now = 4.0
    assert worker.hold_left() == limit - 4.0
    load.now = limit
    assert worker.hold_left() == 0.0  # ran out: deliver
    load.now = limit + 1
    assert worker.hold_left() == 0.0  # still catching up, although saturated
    await send(port(app), make_mail("Backlog"))
    assert await worker.drain() == 2  # nothing left due: caught up
    assert worker.hold_left() == limit  # a new hold
    load.value, load.now = 0.5, limit + 5
    assert worker.hold_left() == 0.0  # a lull: deliver meanwhile...
    load.value, load.now = 1.0, limit + 6
    assert worker.hold_left() == limit - 5  # ...but the hold goes on, not afresh
    load.now = 2 * limit + 1
    assert worker.hold_left() == 0.0  # ran out: catch up
    assert await worker.drain() == 0
    load.now = 2 * limit + 50
    assert worker.hold_left() == limit  # caught up: a new hold counts afresh
    worker.settings = app.settings.outbound.model_copy(update={"burst_hold_seconds": 0})
    assert worker.hold_left() == 0.0  # switched off


def test_the_writer_load_follows_its_busy_share() -> None:
    intake = Intake(cast(Any, None), cast(Any, None))
    t = 100.0
    for _ in range(200):  # two seconds, busy 9 ms of every 10
        intake.note_busy(t, t + 0.009)
        t += 0.010
    assert 0.85 < intake.load(t) < 0.95
    assert intake.load(t + 1.0) < 0.02  # a second after the burst
    quiet = Intake(cast(Any, None), cast(Any, None))
    for _ in range(10):  # ten messages a second, 5 ms each
        quiet.note_busy(t, t + 0.005)
        t += 0.1
    assert quiet.load(t) < 0.1
