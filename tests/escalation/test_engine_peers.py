"""Several daemons on one database, and restarts: every alarm fires exactly once.

Two `App` instances share the `db_url` database (PostgreSQL, where `FOR UPDATE
SKIP LOCKED` keeps them apart, and SQLite, where `BEGIN IMMEDIATE` serialises
them). Restarts move time with time-machine under the daemon's real clock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import time_machine
from sla_helpers import LEAD1, berlin, count_events, customer_mail, outbox, sla_settings
from sqlalchemy import func, select
from support.sink import SmtpSink

from gateway.config import Settings
from gateway.daemon import App
from gateway.escalation.engine import FireStats
from gateway.mail.transport import SmtpTransport
from gateway.store.models import Event, Ticket

MONDAY_9 = berlin(2026, 11, 23, 9, 0)
TICKETS = 30


def transport(sink: SmtpSink) -> SmtpTransport:
    return SmtpTransport("127.0.0.1", sink.port, starttls=False, username="", password="",
                         timeout=5)


@pytest.fixture
def peer_settings(settings: Settings) -> Settings:
    # Small batches: the two daemons' claims interleave instead of one taking everything.
    return sla_settings(settings, escalation={"batch_size": 4})


@pytest.fixture
async def peers(peer_settings: Settings, sink: SmtpSink,
                clock: Any) -> AsyncIterator[tuple[App, App]]:
    clock.now = MONDAY_9
    first = App(peer_settings, clock=clock, transport=transport(sink), run_outbox=False)
    second = App(peer_settings, clock=clock, transport=transport(sink), run_outbox=False,
                 migrate_schema=False)
    await first.start()
    await second.start()
    yield first, second
    await second.stop()
    await first.stop()


def breaches_per_ticket(app: App) -> dict[str, int]:
    with app.sessions() as s:
        rows = s.execute(select(Ticket.number, func.count(Event.id))
                         .join(Event, Event.ticket_id == Ticket.id)
                         .where(Event.kind == "sla-breach").group_by(Ticket.number)).all()
    return {number: int(n) for number, n in rows}


async def test_two_schedulers_never_fire_one_deadline_twice(
    peers: tuple[App, App], clock: Any
) -> None:
    first, second = peers
    numbers = [customer_mail(first, subject=f"Problem {i}").ticket for i in range(TICKETS)]
    clock.now = berlin(2026, 11, 23, 13, 0)  # every first response breached
    await asyncio.gather(first.escalation.kick(), second.escalation.kick())
    assert breaches_per_ticket(first) == dict.fromkeys(numbers, 1)
    assert count_events(first, "escalated") == TICKETS
    assert len(outbox(first, kind="escalation", to=LEAD1)) == TICKETS
    # The warnings (due at 12:00) were superseded, not sent late.
    assert count_events(first, "sla-warning") == 0
    # Shared out (PostgreSQL: SKIP LOCKED) or taken by one (SQLite: serialised writers),
    # the two daemons' counts add up to one breach per ticket.
    assert first.escalation.totals.breaches + second.escalation.totals.breaches == TICKETS
    assert first.sla.next_due() == berlin(2026, 11, 23, 14, 30)  # L2's warnings


def test_racing_engines_in_threads_claim_disjoint_tickets(
    peer_settings: Settings, clock: Any
) -> None:
    clock.now = MONDAY_9
    first = App(peer_settings, clock=clock)
    second = App(peer_settings, clock=clock, migrate_schema=False)
    try:
        for i in range(TICKETS):
            customer_mail(first, subject=f"Problem {i}")
        now = berlin(2026, 11, 23, 13, 0)
        barrier = threading.Barrier(4)
        results: list[FireStats] = []

        def race(app: App) -> None:
            barrier.wait()
            results.append(app.sla.fire_due(now))

        threads = [threading.Thread(target=race, args=(app,))
                   for app in (first, second, first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sum(r.breaches for r in results) == TICKETS
        assert sum(r.errors for r in results) == 0
        assert set(breaches_per_ticket(first).values()) == {1}
        assert len(breaches_per_ticket(first)) == TICKETS
    finally:
        first.engine.dispose()
        second.engine.dispose()


async def test_a_restart_fires_what_fell_due_exactly_once(
    peer_settings: Settings, sink: SmtpSink
) -> None:
    # The daemon's own clock (utcnow) under time-machine: APScheduler sees the same time.
    with time_machine.travel(MONDAY_9, tick=False) as traveller:
        app = App(peer_settings, transport=transport(sink), run_outbox=False)
        await app.start()
        number = customer_mail(app).ticket
        await app.stop()

        traveller.move_to(berlin(2026, 11, 23, 13, 30))  # down over warning and breach
        for _ in range(2):
            restarted = App(peer_settings, transport=transport(sink), run_outbox=False)
            await restarted.start()
            await restarted.escalation.wait_passes(1)  # the start-up pass
            # L2 took over at 13:30: its warning at 75% of 2 hours.
            assert restarted.escalation.armed_at == berlin(2026, 11, 23, 15, 0)
            await restarted.stop()
        assert breaches_per_ticket(restarted) == {number: 1}
        assert count_events(restarted, "sla-warning") == 0
        [lead] = outbox(restarted, kind="escalation", to=LEAD1)
        assert lead.created_at == dt.datetime.now(dt.UTC)


async def test_the_timer_fires_on_its_own_under_time_machine(
    peer_settings: Settings, sink: SmtpSink
) -> None:
    """No kick: APScheduler's date trigger, armed at the warning, runs the pass."""
    with time_machine.travel(MONDAY_9, tick=False) as traveller:
        app = App(peer_settings, transport=transport(sink), run_outbox=False)
        await app.start()
        try:
            await app.escalation.wait_passes(1)
            customer_mail(app)
            await asyncio.sleep(0)  # the commit's offer reaches the loop
            assert app.escalation.armed_at == berlin(2026, 11, 23, 12, 0)
            passes = app.escalation.passes
            traveller.move_to(berlin(2026, 11, 23, 12, 0))
            # The asyncio timer still waits in real (monotonic) time; APScheduler's wakeup
            # re-reads its due jobs with the moved clock, as after a suspend and resume.
            app.escalation._scheduler.wakeup()  # type: ignore[union-attr]
            await app.escalation.wait_passes(passes + 1)
            assert count_events(app, "sla-warning") == 1
        finally:
            await app.stop()
