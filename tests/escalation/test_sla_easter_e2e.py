"""End to end over real SMTP: a mail before Easter, the warning after the holidays.

A customer writes on Thursday 28 March 2024 at 16:30 in Berlin (Good Friday was the
29th, so the Friday itself is a holiday; Thursday is the last working day before
Easter). First line's SLA: first response within 4 business hours, warning at 75%.
Half an hour is left on Thursday; Good Friday, the weekend and Easter Monday are
shut, and the clocks go forward to CEST on the Sunday. 150 minutes from Tuesday
09:00 CEST: the warning is due at 11:30 CEST (09:30 UTC), the breach at 12:30 CEST.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
from typing import Any

from sla_helpers import berlin, count_events, events, outbox, sla_settings, ticket_row
from sqlalchemy import select
from support.mailer import make_mail, send
from support.sink import SmtpSink

from gateway.config import Settings
from gateway.daemon import App
from gateway.escalation.report import calendar_view, sla_explain
from gateway.mail.transport import SmtpTransport
from gateway.store.models import Ticket

THURSDAY_1630 = berlin(2024, 3, 28, 16, 30)
WARNING = dt.datetime(2024, 4, 2, 9, 30, tzinfo=dt.UTC)


async def test_mail_before_easter_warns_at_the_right_business_minute(
    settings: Settings, sink: SmtpSink, clock: Any
) -> None:
    clock.now = THURSDAY_1630
    transport = SmtpTransport("127.0.0.1", sink.port, starttls=False, username="",
                              password="", timeout=5)
    app = App(sla_settings(settings), clock=clock, transport=transport, run_outbox=False)
    await app.start()
    try:
        port: int = app.channels[0].port  # type: ignore[attr-defined]
        code, text = await send(port, make_mail("VPN to the cluster fails",
                                                "Since this afternoon the VPN drops.\n"))
        assert code == 250, text
        with app.sessions() as s:
            number = s.scalars(select(Ticket.number)).one()
        t = ticket_row(app, number)
        assert t.created_at == THURSDAY_1630
        assert t.first_response_due == berlin(2024, 4, 2, 12, 30) == WARNING + dt.timedelta(hours=1)
        assert t.next_escalation_at == WARNING

        # The calendar shows why: Karfreitag and Ostermontag skipped.
        view = calendar_view("berlin", app.sla.calendars["berlin"], dt.date(2024, 3, 28), 6)
        assert [(h["date"], h["name"]) for h in view["holidays"]] == [
            ("2024-03-29", "Karfreitag"), ("2024-04-01", "Ostermontag")]

        # Through the holidays, nothing fires; then exactly at 11:30 CEST the warning does.
        for moment in (berlin(2024, 3, 29, 10), berlin(2024, 3, 31, 12), berlin(2024, 4, 1, 12),
                       berlin(2024, 4, 2, 9), WARNING - dt.timedelta(minutes=1)):
            clock.now = moment
            await app.escalation.kick()
            assert count_events(app, "sla-warning") == 0, moment
        clock.now = WARNING
        await app.escalation.kick()
        [warning] = events(app, number, "sla-warning")
        assert warning.at == WARNING
        assert warning.data["due"] == "2024-04-02T10:30:00+00:00"
        [row] = outbox(app, kind="escalation")
        assert (row.created_at, row.next_attempt_at) == (WARNING, WARNING)

        # `sla explain` tells the same story.
        explained = sla_explain(app.sla, app.sessions, number, WARNING)
        assert explained is not None
        [fr, solution] = explained["clocks"]
        assert fr["warning_fired"] and not fr["breach_fired"]
        assert fr["used_minutes"] == 180 and fr["remaining_minutes"] == 60
        assert "2024-03-28 16:30 CET" in fr["how"] and "due 2024-04-02 12:30 CEST" in fr["how"]

        # And the mail goes out through the smarthost to First Line's agent.
        before = len(sink.messages)
        await app.outbox.drain()  # type: ignore[union-attr]
        mail = next(m for m in sink.messages[before:] if "alice@agents.test" in m.rcpt_tos
                    and "SLA warning" in str(m.message["Subject"]))
        msg = email.message_from_bytes(mail.raw, policy=email.policy.default)
        assert msg["Subject"] == f"SLA warning: [Ticket#{number}] VPN to the cluster fails"
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["Reply-To"].addresses[0].addr_spec.startswith(f"help+{number}.")
        body = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "the first response is due at 2024-04-02 12:30 CEST" in body
        assert "Used:     180 of 240 business minutes" in body
    finally:
        await app.stop()
