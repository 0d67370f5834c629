"""Firing SLA alarms through a running daemon: warning, breach, escalation, business hours.

Time moves with the settable `clock` fixture the App runs on; `escalation.kick()`
re-arms the APScheduler timer after a move and waits for the firing pass it
triggers. Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sla_helpers import (
    INCIDENTS,
    LEAD1,
    LEAD2,
    agent_reply,
    berlin,
    count_events,
    customer_mail,
    events,
    outbox,
    sla_settings,
    ticket_row,
)
from support.sink import SmtpSink

from gateway.config import Settings
from gateway.daemon import App
from gateway.mail.transport import SmtpTransport

MONDAY_9 = berlin(2026, 11, 23, 9, 0)


async def started(settings: Settings, sink: SmtpSink, clock: Any) -> App:
    transport = SmtpTransport("127.0.0.1", sink.port, starttls=False, username="",
                              password="", timeout=5)
    app = App(settings, clock=clock, transport=transport, run_outbox=False)
    await app.start()
    return app


@pytest.fixture
async def sla_app(settings: Settings, sink: SmtpSink, clock: Any) -> AsyncIterator[App]:
    clock.now = MONDAY_9
    app = await started(sla_settings(settings), sink, clock)
    yield app
    await app.stop()


def new_ticket(app: App, **kw: Any) -> str:
    result = customer_mail(app, **kw)
    assert result.ticket is not None, result
    return result.ticket


async def test_deadlines_stored_at_creation(sla_app: App) -> None:
    await sla_app.escalation.wait_passes(1)  # the start-up pass: nothing due, nothing armed
    assert sla_app.escalation.armed_at is None
    number = new_ticket(sla_app)
    t = ticket_row(sla_app, number)
    assert t.sla_name == "standard"
    # 4 business hours from Monday 09:00; warning at 75% = 12:00.
    assert t.first_response_due == berlin(2026, 11, 23, 13, 0)
    assert t.next_escalation_at == berlin(2026, 11, 23, 12, 0)
    # Five working days: next Monday, same wall time.
    assert t.solution_due == berlin(2026, 11, 30, 9, 0)
    # No update clock before the first response.
    assert t.update_due is None
    [sla] = events(sla_app, number, "sla")
    assert sla.data == {"from": None, "to": "standard", "why": "group First Line",
                        "calendar": "berlin"}
    # The commit armed the timer at the ticket's warning (on the loop's next turn),
    # without asking the database.
    await asyncio.sleep(0)
    assert sla_app.escalation.armed_at == berlin(2026, 11, 23, 12, 0)


async def test_agents_read_the_due_time_where_their_group_works(sla_app: App) -> None:
    new_ticket(sla_app)
    [row] = outbox(sla_app, kind="notify")
    assert row.raw is not None
    # First response due Monday 13:00 in Berlin (12:00 UTC), shown as Berlin time.
    assert b"Due:     2026-11-23 13:00 CET (SLA standard)" in row.raw


async def test_warning_then_breach_escalates_to_the_next_group(
    sla_app: App, clock: Any, sink: SmtpSink
) -> None:
    number = new_ticket(sla_app)
    clock.now = berlin(2026, 11, 23, 11, 59)
    await sla_app.escalation.kick()
    assert count_events(sla_app, "sla-warning") == 0

    clock.now = berlin(2026, 11, 23, 12, 0)
    await sla_app.escalation.kick()
    [warning] = events(sla_app, number, "sla-warning")
    assert warning.data["clock"] == "first_response"
    assert warning.data["to"] == ["alice@agents.test"]  # no owner: the group's agents
    [mail] = outbox(sla_app, kind="escalation")
    assert mail.to_address == "alice@agents.test"
    assert mail.next_attempt_at == clock.now  # inside business hours: not held
    assert b"SLA warning: [Ticket#" in mail.raw  # type: ignore[operator]

    clock.now = berlin(2026, 11, 23, 13, 0)
    await sla_app.escalation.kick()
    [breach] = events(sla_app, number, "sla-breach")
    assert breach.data["clock"] == "first_response"
    assert breach.data["level"] == 1
    [escalated] = events(sla_app, number, "escalated")
    assert escalated.data["from_group"] == "First Line"
    assert escalated.data["to_group"] == "Catalogue Support"
    t = ticket_row(sla_app, number)
    assert (t.group, t.escalation_level, t.sla_name) == ("Catalogue Support", 1, "l2")
    # The new group's clocks start at the move: L2 has 2 business hours.
    assert t.sla_started_at == clock.now
    assert t.first_response_due == berlin(2026, 11, 23, 15, 0)
    recipients = sorted(r.to_address for r in outbox(sla_app, kind="escalation"))
    assert recipients == sorted(["alice@agents.test", LEAD1, "bob@agents.test",
                                 "carol@agents.test"])
    # Delivered for real through the smarthost.
    await sla_app.outbox.drain()  # type: ignore[union-attr]
    subjects = {m.rcpt_tos[0]: m.message["Subject"] for m in sink.messages}
    assert subjects[LEAD1].startswith("SLA breach: [Ticket#")
    assert subjects["bob@agents.test"].startswith("Escalated: [Ticket#")

    # L2 misses too: on to Orders, level 2; L1's lead is not told again.
    clock.now = berlin(2026, 11, 23, 15, 0)
    await sla_app.escalation.kick()
    t = ticket_row(sla_app, number)
    assert (t.group, t.escalation_level) == ("Orders", 2)
    assert [r.to_address for r in outbox(sla_app, kind="escalation", to=LEAD2)] == [LEAD2]
    assert len(outbox(sla_app, kind="escalation", to=LEAD1)) == 1


async def test_nothing_fires_twice_on_recompute(sla_app: App, clock: Any) -> None:
    number = new_ticket(sla_app)
    clock.now = berlin(2026, 11, 23, 12, 30)
    await sla_app.escalation.kick()
    assert count_events(sla_app, "sla-warning") == 1
    # A customer follow-up recomputes the ticket in the same cycle: no second warning.
    customer_mail(sla_app, subject=f"Re: [Ticket#{number}] Portal down", body="Any news?\n")
    await sla_app.escalation.kick()
    await sla_app.escalation.kick()
    assert count_events(sla_app, "sla-warning") == 1


async def test_pending_or_closed_and_reopened_fires_nothing_twice(
    settings: Settings, sink: SmtpSink, clock: Any
) -> None:
    clock.now = MONDAY_9
    app = await started(sla_settings(settings, groups={"First Line": {"breach_move": False}}),
                        sink, clock)
    try:
        number = new_ticket(app)
        clock.now = berlin(2026, 11, 23, 12, 1)
        await app.escalation.kick()
        assert count_events(app, "sla-warning") == 1
        # Pending before the breach, reopened: the clock resumes in the same cycle.
        clock.now = berlin(2026, 11, 23, 12, 10)
        agent_reply(app, number, "#pending")
        clock.now = berlin(2026, 11, 23, 14, 0)
        agent_reply(app, number, "#open")
        await app.escalation.kick()
        assert count_events(app, "sla-warning") == 1
        # 4h used at 14:50 (09:00-12:10 and 14:00-14:50): the breach fires once.
        clock.now = berlin(2026, 11, 23, 14, 51)
        await app.escalation.kick()
        assert count_events(app, "sla-breach") == 1
        # Closed and reopened: the missed deadline does not escalate a second time.
        clock.now = berlin(2026, 11, 23, 15, 0)
        agent_reply(app, number, "#close")
        clock.now = berlin(2026, 11, 23, 16, 0)
        agent_reply(app, number, "#open")
        await app.escalation.kick()
        assert count_events(app, "sla-breach") == 1
        assert count_events(app, "escalated") == 1
        assert ticket_row(app, number).escalation_level == 1
        assert count_events(app, "sla-warning") == 1
    finally:
        await app.stop()


async def test_breach_outside_business_hours_waits_for_the_morning(
    sla_app: App, clock: Any
) -> None:
    new_ticket(sla_app)
    # The daemon only gets to it at 20:00 (it was down): warning skipped, breach fired,
    # the leads' mail held until 09:00 the next business day.
    clock.now = berlin(2026, 11, 23, 20, 0)
    await sla_app.escalation.kick()
    assert count_events(sla_app, "sla-warning") == 0
    assert count_events(sla_app, "sla-breach") == 1
    [lead] = outbox(sla_app, kind="escalation", to=LEAD1)
    assert lead.next_attempt_at == berlin(2026, 11, 24, 9, 0)
    [moved] = outbox(sla_app, kind="escalation", to="bob@agents.test")
    assert moved.next_attempt_at == berlin(2026, 11, 24, 9, 0)
    # Not sent before then (the acknowledgement and the new-ticket notification are).
    assert await sla_app.outbox.drain() == 2  # type: ignore[union-attr]
    assert {r.state for r in outbox(sla_app, kind="escalation")} == {"pending"}
    clock.now = berlin(2026, 11, 24, 9, 0)
    await sla_app.outbox.drain()  # type: ignore[union-attr]
    assert {r.state for r in outbox(sla_app, kind="escalation")} == {"sent"}


async def test_escalation_mail_anytime_is_not_held(
    settings: Settings, sink: SmtpSink, clock: Any
) -> None:
    clock.now = MONDAY_9
    app = await started(sla_settings(settings, groups={
        "First Line": {"escalation_mail_anytime": True, "breach_move": False,
                       "breach_raise_priority": True}}), sink, clock)
    try:
        number = new_ticket(app)
        clock.now = berlin(2026, 11, 23, 20, 0)
        await app.escalation.kick()
        [lead] = outbox(app, kind="escalation", to=LEAD1)
        assert lead.next_attempt_at == clock.now
        t = ticket_row(app, number)
        # Not moved, but raised; the raise does not re-breach the same cycle.
        assert (t.group, t.priority, t.escalation_level) == ("First Line", "high", 1)
        await app.escalation.kick()
        assert count_events(app, "sla-breach") == 1
    finally:
        await app.stop()


async def test_owner_gets_the_warning_and_a_reply_stops_the_clock(
    sla_app: App, clock: Any
) -> None:
    number = new_ticket(sla_app)
    clock.now = berlin(2026, 11, 23, 10, 0)
    agent_reply(sla_app, number, "#assign me\n#note\n\nLooking.")  # internal: no response
    assert ticket_row(sla_app, number).owner == "alice@agents.test"
    clock.now = berlin(2026, 11, 23, 12, 0)
    await sla_app.escalation.kick()
    [warning] = events(sla_app, number, "sla-warning")
    assert warning.data["to"] == ["alice@agents.test"]
    clock.now = berlin(2026, 11, 23, 12, 30)
    agent_reply(sla_app, number, "Fixed the portal, please try again.")
    t = ticket_row(sla_app, number)
    assert t.first_response_at == clock.now
    assert t.first_response_due is None
    # The update clock now runs from the reply: one working day.
    assert t.update_due == berlin(2026, 11, 24, 12, 30)
    clock.now = berlin(2026, 11, 23, 13, 0)
    await sla_app.escalation.kick()
    assert count_events(sla_app, "sla-breach") == 0


async def test_major_incident_command(sla_app: App, clock: Any) -> None:
    number = new_ticket(sla_app)
    clock.now = berlin(2026, 11, 23, 9, 10)
    agent_reply(sla_app, number, "#major\n#note\n\nWhole portal down.")
    t = ticket_row(sla_app, number)
    assert t.major_at == clock.now and t.sla_name == "major"
    # The major SLA applies to the time already used: 30 minutes from 09:00.
    assert t.first_response_due == berlin(2026, 11, 23, 9, 30)
    [notice] = outbox(sla_app, kind="incident")
    assert notice.to_address == INCIDENTS
    assert notice.next_attempt_at == clock.now
    assert b"MAJOR INCIDENT: [Ticket#" in notice.raw  # type: ignore[operator]
    # A second #major changes nothing.
    agent_reply(sla_app, number, "#major\n#note\n\nstill down")
    assert len(outbox(sla_app, kind="incident")) == 1
    assert count_events(sla_app, "major-incident") == 1
    # Closing writes the review record with the whole timeline.
    clock.now = berlin(2026, 11, 23, 9, 20)
    agent_reply(sla_app, number, "#close\n\nThe portal is back.")
    from gateway.escalation.report import incident_reviews

    [review] = incident_reviews(sla_app.sessions, number) or []
    kinds = [item["kind"] for item in review["timeline"]]
    assert "created" in kinds and "major-incident" in kinds and "command:close" in kinds
    assert review["summary"]["minutes_open"] == 10
    assert any(item["type"] == "article" for item in review["timeline"])


async def test_only_a_change_into_closed_writes_an_incident_review(
    sla_app: App, clock: Any
) -> None:
    from gateway.escalation.report import incident_reviews

    number = new_ticket(sla_app)
    agent_reply(sla_app, number, "#major\n#note\n\nPortal down.")
    clock.now = berlin(2026, 11, 23, 10, 0)
    agent_reply(sla_app, number, "#close")
    assert len(incident_reviews(sla_app.sessions, number) or []) == 1
    # #close on the closed incident (also twice in one reply): no second record.
    clock.now = berlin(2026, 11, 23, 10, 5)
    agent_reply(sla_app, number, "#close")
    agent_reply(sla_app, number, "#close\n#close")
    assert len(incident_reviews(sla_app.sessions, number) or []) == 1
    assert count_events(sla_app, "incident-review") == 1
    # Reopened and closed again: a new closing, a new record.
    clock.now = berlin(2026, 11, 23, 11, 0)
    agent_reply(sla_app, number, "#open\n#close")
    assert len(incident_reviews(sla_app.sessions, number) or []) == 2


async def test_major_incident_by_rule_tag(
    settings: Settings, sink: SmtpSink, clock: Any, tmp_path: Any
) -> None:
    rules = tmp_path / "rules" / "20-major.yaml"
    rules.write_text("rules:\n  - name: outage\n    when: {subject: {contains: outage}}\n"
                     "    then: {tags: [major-incident]}\n")
    clock.now = MONDAY_9
    app = await started(sla_settings(settings), sink, clock)
    try:
        number = new_ticket(app, subject="Total outage of the portal")
        t = ticket_row(app, number)
        assert t.major_at == MONDAY_9 and t.sla_name == "major"
        [ev] = events(app, number, "major-incident")
        assert ev.data["why"] == "routing rule tag major-incident"
        assert [r.to_address for r in outbox(app, kind="incident")] == [INCIDENTS]
    finally:
        await app.stop()


async def test_sla_selected_by_rule_tag_and_priority(
    settings: Settings, sink: SmtpSink, clock: Any, tmp_path: Any
) -> None:
    (tmp_path / "rules" / "20-vip.yaml").write_text(
        "rules:\n  - name: vip\n    when: {from: {domain: vip.test}}\n"
        "    then: {tags: ['sla:l2']}\n")
    clock.now = MONDAY_9
    app = await started(sla_settings(settings, groups={
        "First Line": {"sla_by_priority": {"high": "major"}}}), sink, clock)
    try:
        vip = new_ticket(app, sender="Vic <vic@vip.test>")
        assert ticket_row(app, vip).sla_name == "l2"
        urgent = new_ticket(app, subject="urgent: cannot log in")  # demo rule: priority high
        assert ticket_row(app, urgent).sla_name == "major"
        plain = new_ticket(app)
        assert ticket_row(app, plain).sla_name == "standard"
        # #priority recomputes with the same origin: 09:00 + 30 min is already past.
        clock.now = berlin(2026, 11, 23, 10, 0)
        agent_reply(app, plain, "#priority high\n#note\n\nraising")
        t = ticket_row(app, plain)
        assert t.sla_name == "major" and t.first_response_due == berlin(2026, 11, 23, 9, 30)
        assert t.next_escalation_at == berlin(2026, 11, 23, 9, 22)  # its warning, 75% of 30
        await app.escalation.kick()
        # Both overdue: the breach fires, the warning that came too late does not.
        assert [e.data["clock"] for e in events(app, plain, "sla-breach")] == ["first_response"]
        assert events(app, plain, "sla-warning") == []
    finally:
        await app.stop()


async def test_pending_until_reminds_the_owner(sla_app: App, clock: Any) -> None:
    number = new_ticket(sla_app)
    agent_reply(sla_app, number, "#assign me\n#pending 2026-11-25 14:00\n\nWill check Wednesday.")
    t = ticket_row(sla_app, number)
    # The agent's 14:00 is read where the group works: Berlin (CET, UTC+1).
    assert t.state == "pending" and t.pending_until == dt.datetime(2026, 11, 25, 13, 0,
                                                                     tzinfo=dt.UTC)
    assert t.next_escalation_at == t.pending_until  # clocks paused; only the reminder
    clock.now = dt.datetime(2026, 11, 25, 13, 0, tzinfo=dt.UTC)
    await sla_app.escalation.kick()
    [ev] = events(sla_app, number, "pending-reminder")
    assert ev.data["to"] == ["alice@agents.test"]
    [row] = outbox(sla_app, kind="reminder")
    assert row.to_address == "alice@agents.test"
    t = ticket_row(sla_app, number)
    assert t.state == "pending" and t.next_escalation_at is None


async def test_waiting_for_the_customer_reminds_then_closes(sla_app: App, clock: Any) -> None:
    number = new_ticket(sla_app)
    agent_reply(sla_app, number, "#pending\n\nPlease send the log file.")
    t = ticket_row(sla_app, number)
    assert t.state == "pending" and t.first_response_at == MONDAY_9
    # 5 working days later, Monday 09:00: first reminder to the customer.
    assert t.next_escalation_at == berlin(2026, 11, 30, 9, 0)
    clock.now = berlin(2026, 11, 30, 9, 0)
    await sla_app.escalation.kick()
    [first] = outbox(sla_app, kind="reminder")
    assert first.to_address == "dana@users.test" and first.automatic
    clock.now = berlin(2026, 12, 7, 9, 0)
    await sla_app.escalation.kick()
    assert [e.data["step"] for e in events(sla_app, number, "reminder")] == [1, 2]
    clock.now = berlin(2026, 12, 14, 9, 0)
    await sla_app.escalation.kick()
    t = ticket_row(sla_app, number)
    assert t.state == "closed" and t.closed_at == clock.now
    assert count_events(sla_app, "closed-unsolved") == 1
    assert len(outbox(sla_app, kind="reminder")) == 3  # two reminders, one closing notice
    # Reopening by the customer resumes the solution clock where it stopped.
    clock.now = berlin(2026, 12, 15, 9, 0)
    customer_mail(sla_app, subject=f"Re: [Ticket#{number}] Portal down", body="Here it is.\n")
    t = ticket_row(sla_app, number)
    assert t.state == "open" and t.solution_due is not None
    # 5 working days from Monday 23 Nov 09:00, all of it paused from 09:00 that day.
    assert t.solution_due == berlin(2026, 12, 22, 9, 0)


async def test_a_closed_ticket_set_pending_waits_from_then(sla_app: App, clock: Any) -> None:
    number = new_ticket(sla_app)
    agent_reply(sla_app, number, "#close")
    # Two weeks later the agent reopens it to wait for the customer: the first reminder
    # is 5 working days from now, not overdue since the close.
    clock.now = berlin(2026, 12, 7, 9, 0)
    agent_reply(sla_app, number, "#pending")
    assert ticket_row(sla_app, number).next_escalation_at == berlin(2026, 12, 14, 9, 0)
    await sla_app.escalation.kick()
    assert outbox(sla_app, kind="reminder") == []
    clock.now = berlin(2026, 12, 14, 9, 0)
    await sla_app.escalation.kick()
    assert len(outbox(sla_app, kind="reminder")) == 1


async def test_a_chat_customer_is_reminded_in_the_chat(sla_app: App, clock: Any) -> None:
    from gateway.store.models import Ticket

    number = new_ticket(sla_app)
    with sla_app.sessions() as s, s.begin():
        t = s.query(Ticket).filter_by(number=number).one()
        t.channel, t.channel_ref = "telegram", {"bot": "helpdesk", "chat_id": 4242}
    agent_reply(sla_app, number, "#pending\n\nWhich browser do you use?")
    clock.now = berlin(2026, 11, 30, 9, 0)
    await sla_app.escalation.kick()
    [row] = outbox(sla_app, kind="reminder")
    assert (row.channel, row.to_address) == ("telegram", "telegram:helpdesk:4242")
    assert row.payload is not None and "still waiting for your answer" in row.payload["text"]
