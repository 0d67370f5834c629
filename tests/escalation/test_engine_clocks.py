"""The SLA observer inside the mail path: clocks paused, resumed, restarted and stored.

Messages go through the real pipeline (`Intake.ingest_now`), the deadlines are
read back from the ticket row: the same transaction stored both.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sla_helpers import (
    agent_reply,
    berlin,
    customer_mail,
    events,
    outbox,
    sla_settings,
    ticket_row,
)

from gateway.config import Settings
from gateway.daemon import App

MONDAY_9 = berlin(2026, 11, 23, 9, 0)


@pytest.fixture
def sla_app(settings: Settings, clock: Any) -> Iterator[App]:
    clock.now = MONDAY_9
    app = App(sla_settings(settings), clock=clock)
    yield app
    app.engine.dispose()


def test_pending_pauses_the_first_response_and_a_customer_reply_resumes_it(
    sla_app: App, clock: Any
) -> None:
    number = customer_mail(sla_app).ticket
    assert number is not None
    # 10:00: the agent sets pending without answering (a command-only reply).
    clock.now = berlin(2026, 11, 23, 10, 0)
    agent_reply(sla_app, number, "#pending")
    t = ticket_row(sla_app, number)
    assert t.state == "pending" and t.first_response_at is None
    assert t.first_response_due is None and t.solution_due is None
    assert t.sla_pauses == [[clock.now.isoformat(), None]]
    # Waiting for the customer: only the first reminder is armed.
    assert t.next_escalation_at == berlin(2026, 11, 30, 10, 0)
    # Tuesday 14:00 the customer answers: open again, 180 minutes left.
    clock.now = berlin(2026, 11, 24, 14, 0)
    customer_mail(sla_app, subject=f"Re: [Ticket#{number}] Portal down", body="Details.\n")
    t = ticket_row(sla_app, number)
    assert t.state == "open"
    assert t.sla_pauses == [[berlin(2026, 11, 23, 10).isoformat(), clock.now.isoformat()]]
    assert t.first_response_due == berlin(2026, 11, 24, 17, 0)
    assert t.next_escalation_at == berlin(2026, 11, 24, 16, 0)  # warning, 180 of 240 used
    # The solution clock (5 working days, due Monday 30th 09:00 unpaused) lost Monday
    # 10-17 and Tuesday 09-14: 12 business hours later.
    assert t.solution_due == berlin(2026, 12, 1, 13, 0)
    # A close stops the clocks; the customer reopening resumes them.
    clock.now = berlin(2026, 11, 24, 15, 0)
    agent_reply(sla_app, number, "#close\n\nDone, I think.")
    t = ticket_row(sla_app, number)
    assert (t.state, t.next_escalation_at, t.solution_due) == ("closed", None, None)
    clock.now = berlin(2026, 11, 25, 9, 0)
    customer_mail(sla_app, subject=f"Re: [Ticket#{number}] Portal down", body="Not done.\n")
    t = ticket_row(sla_app, number)
    # Closed Tuesday 15-17 cost two more business hours.
    assert t.state == "open" and t.solution_due == berlin(2026, 12, 1, 15, 0)
    # The oldest unanswered customer message starts the update clock (1 working day).
    assert t.update_due == berlin(2026, 11, 26, 9, 0)


def test_moving_groups_restarts_the_clocks_under_the_new_sla(sla_app: App, clock: Any) -> None:
    number = customer_mail(sla_app).ticket
    assert number is not None
    clock.now = berlin(2026, 11, 23, 11, 0)
    agent_reply(sla_app, number, "#group Catalogue Support\n#note\n\nFor you.")
    t = ticket_row(sla_app, number)
    assert (t.group, t.sla_name, t.sla_started_at) == ("Catalogue Support", "l2", clock.now)
    assert t.first_response_due == berlin(2026, 11, 23, 13, 0)  # l2: 2 hours from the move
    assert [e.data["to"] for e in events(sla_app, number, "sla")] == ["standard", "l2"]


def test_customer_follow_ups_keep_the_oldest_unanswered_message(
    sla_app: App, clock: Any
) -> None:
    number = customer_mail(sla_app).ticket
    assert number is not None
    agent_reply(sla_app, number, "Looking into it.")
    clock.now = berlin(2026, 11, 23, 10, 0)
    customer_mail(sla_app, subject=f"Re: [Ticket#{number}] x", body="first\n")
    clock.now = berlin(2026, 11, 23, 12, 0)
    customer_mail(sla_app, subject=f"Re: [Ticket#{number}] x", body="second\n")
    t = ticket_row(sla_app, number)
    assert t.unanswered_since == berlin(2026, 11, 23, 10, 0)
    assert t.update_due == berlin(2026, 11, 24, 10, 0)


def test_without_escalation_config_nothing_is_armed(settings: Settings, clock: Any) -> None:
    app = App(settings, clock=clock)
    try:
        number = customer_mail(app).ticket
        assert number is not None
        t = ticket_row(app, number)
        assert (t.sla_name, t.first_response_due, t.next_escalation_at) == (None, None, None)
        # Clock state is kept anyway, so configuring an SLA later has a history to use.
        assert t.sla_started_at == clock.now and t.unanswered_since == clock.now
        assert events(app, number, "sla") == []
        # `#pending <time>` needs no calendar: the owner is reminded even here.
        agent_reply(app, number, "#pending 2026-12-01 09:00")
        assert ticket_row(app, number).next_escalation_at is not None
    finally:
        app.engine.dispose()


def test_a_ticket_from_before_the_upgrade_gets_clocks_on_its_next_change(
    sla_app: App, clock: Any
) -> None:
    number = customer_mail(sla_app).ticket
    assert number is not None
    from gateway.store.models import Ticket

    with sla_app.sessions() as s, s.begin():
        t = s.query(Ticket).filter_by(number=number).one()
        for column in ("sla_name", "sla_started_at", "sla_pauses", "sla_fired",
                       "unanswered_since", "first_response_due", "next_escalation_at"):
            setattr(t, column, None)
    clock.now = berlin(2026, 11, 23, 10, 0)
    customer_mail(sla_app, subject=f"Re: [Ticket#{number}] x", body="hello?\n")
    t = ticket_row(sla_app, number)
    # The origin falls back to the creation time.
    assert t.sla_name == "standard" and t.first_response_due == berlin(2026, 11, 23, 13, 0)


def test_an_sla_failure_does_not_quarantine_the_mail(
    sla_app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(ticket: Any) -> Any:
        raise RuntimeError("calendar exploded")

    monkeypatch.setattr(sla_app.sla, "policy_for", broken)
    result = customer_mail(sla_app)
    assert result.outcome.value == "created" and result.ticket is not None
    t = ticket_row(sla_app, result.ticket)
    assert (t.state, t.next_escalation_at, t.sla_name) == ("new", None, None)
    [error] = events(sla_app, result.ticket, "sla-error")
    assert error.data == {"change": "created", "error": "RuntimeError: calendar exploded"}
    # The acknowledgement and the agents' notification still went out.
    assert {r.kind for r in outbox(sla_app)} == {"ack", "notify"}


def test_a_major_incident_opened_in_a_batch_keeps_its_trail_in_order(
    settings: Settings, clock: Any, tmp_path: Any
) -> None:
    """The intake's fast path writes audit events after the ORM's flush; a ticket
    whose routing declares a major incident has the SLA engine flush and open a
    savepoint mid-batch. Its trail still reads in the order things happened."""
    from support.mailer import make_mail

    from gateway.message import Channel, Inbound

    (tmp_path / "rules" / "20-major.yaml").write_text(
        "rules:\n  - name: outage\n    when: {subject: {contains: outage}}\n"
        "    then: {tags: [major-incident]}\n")
    clock.now = MONDAY_9
    app = App(sla_settings(settings), clock=clock)
    try:
        inbounds = [Inbound(Channel.EMAIL, make_mail(subject), clock.now, "test",
                            "dana@users.test", ("help@helpdesk.test",))
                    for subject in ("Slow search", "Total outage of the portal", "A question")]
        results = app.intake._process_batch(inbounds)
        assert app.intake.redone == 0  # decided on the fast path itself
        number = results[1].ticket
        assert number is not None
        kinds = [e.kind for e in events(app, number)]
        assert kinds[:2] == ["created", "routed"]
        assert "major-incident" in kinds[2:]
        assert ticket_row(app, number).major_at == MONDAY_9
    finally:
        app.engine.dispose()
