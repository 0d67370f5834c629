"""Automatic mail, loops, delivery reports and rate limits over real SMTP (B6, B17-B19)."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import func, select
from support.mailer import make_mail, send
from support.sink import SmtpSink

from gateway.cli import ticket_detail
from gateway.daemon import App
from gateway.store.models import Article, OutboxRow, Ticket


def port(app: App) -> int:
    return app.channels[0].port  # type: ignore[attr-defined,no-any-return]


def rows(app: App, kind: str | None = None) -> list[OutboxRow]:
    with app.sessions() as s:
        q = select(OutboxRow).order_by(OutboxRow.id)
        if kind:
            q = q.where(OutboxRow.kind == kind)
        return list(s.scalars(q))


def tickets(app: App) -> list[dict[str, Any]]:
    with app.sessions() as s:
        numbers = list(s.scalars(select(Ticket.number).order_by(Ticket.id)))
    out = [ticket_detail(app, n) for n in numbers]
    return [t for t in out if t is not None]


AUTOMATIC = [
    ({"Auto-Submitted": "auto-replied"}, "dana@users.test"),
    ({"Auto-Submitted": "auto-generated"}, "dana@users.test"),
    ({"Precedence": "bulk"}, "dana@users.test"),
    ({"Precedence": "junk"}, "dana@users.test"),
    ({"Precedence": "list"}, "dana@users.test"),
    ({"X-Autoreply": "yes"}, "dana@users.test"),
    ({"X-Autorespond": "yes"}, "dana@users.test"),
    ({"X-Auto-Response-Suppress": "All"}, "dana@users.test"),
    ({"X-Auto-Response-Suppress": "OOF"}, "dana@users.test"),
    ({"X-Auto-Response-Suppress": "AutoReply"}, "dana@users.test"),
    ({"List-Id": "<users.lists.test>"}, "dana@users.test"),
    ({}, ""),  # null envelope sender
]


@pytest.mark.parametrize(("headers", "mail_from"), AUTOMATIC,
                         ids=[next(iter(h.items()), ("null", "sender"))[0] + "=" +
                              next(iter(h.values()), "") for h, _ in AUTOMATIC])
async def test_automatic_mail_opens_ticket_without_acknowledgement(
    app: App, headers: dict[str, str], mail_from: str
) -> None:
    code, text = await send(port(app), make_mail("Out of the blue", headers=headers),
                            mail_from=mail_from)
    assert code == 250 and "created" in text
    [ticket] = tickets(app)
    assert ticket["articles"][0]["automatic"] is True
    assert rows(app, "ack") == []
    # B7: a ticket opened by automatic mail still notifies the group.
    assert len(rows(app, "notify")) == 1


async def test_auto_submitted_no_is_not_automatic(app: App) -> None:
    await send(port(app), make_mail("Normal", headers={"Auto-Submitted": "no"}))
    assert len(rows(app, "ack")) == 1


async def test_out_of_office_reply_threads_without_notifying(app: App, sink: SmtpSink) -> None:
    await send(port(app), make_mail("Question"))
    await sink.wait_for(2)
    [ticket] = tickets(app)
    ack = [m for m in sink.messages if "dana@users.test" in m.rcpt_tos][0]
    parsed = email.message_from_bytes(ack.raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    ooo = make_mail(f"Automatic reply: {parsed['Subject']}", "I am out of office.",
                    headers={"Auto-Submitted": "auto-replied", "X-Autoreply": "yes"},
                    in_reply_to=parsed["Message-ID"])
    before = len(rows(app))
    await send(port(app), ooo)
    [after] = tickets(app)
    assert len(after["articles"]) == 2
    assert after["articles"][1]["kind"] == "public" and after["articles"][1]["automatic"]
    assert len(rows(app)) == before  # no notification, no acknowledgement
    assert after["number"] == ticket["number"]


async def test_own_mail_coming_back_is_discarded(app: App, sink: SmtpSink) -> None:
    await send(port(app), make_mail("Loop test"))
    await sink.wait_for(2)
    ack = sink.messages[0].raw
    # A forwarder stripped Auto-Submitted and Precedence but kept our X-Loop (B19).
    # It also gave the message a new Message-ID, so only X-Loop gives it away.
    stripped = b"\r\n".join(
        b"Message-ID: <fwd-1@forwarder.users.test>" if line.lower().startswith(b"message-id")
        else line
        for line in ack.split(b"\r\n") if not line.lower().startswith(b"auto-submitted")
    )
    code, text = await send(port(app), stripped, mail_from="forwarder@users.test")
    assert code == 250 and "loop" in text
    assert len(tickets(app)) == 1 and len(tickets(app)[0]["articles"]) == 1


async def test_message_id_of_our_domain_is_a_loop(app: App) -> None:
    raw = make_mail("Looks like ours", message_id="<abc.123@helpdesk.test>")
    code, text = await send(port(app), raw)
    assert "loop" in text
    assert tickets(app) == []


async def test_no_mail_to_own_addresses(app: App) -> None:
    # A mail claiming to come from our own inbound address: no acknowledgement to it.
    raw = make_mail("From ourselves", sender="help@helpdesk.test")
    await send(port(app), raw, mail_from="someone@users.test")
    assert rows(app, "ack") == []


def dsn_for(original_id: str, recipient: str, status: str = "5.1.1") -> bytes:
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.users.test>\r\n"
        "To: help@helpdesk.test\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <dsn-1@mx.users.test>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        "\r\n--B\r\nContent-Type: text/plain\r\n\r\n"
        "I'm sorry to have to inform you that your message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.users.test\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        "Action: failed\r\n"
        f"Status: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} <{recipient}>: Recipient address rejected\r\n"
        "\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: <{original_id}>\r\n"
        "Subject: whatever\r\n"
        "\r\n--B--\r\n"
    ).encode()


async def test_bounce_of_acknowledgement_becomes_internal_note(app: App, sink: SmtpSink) -> None:
    await send(port(app), make_mail("Please help", sender="typo@users.test"),
               mail_from="typo@users.test")
    await sink.wait_for(2)
    [ack] = rows(app, "ack")
    assert ack.message_id is not None
    before = len(rows(app))
    code, text = await send(port(app), dsn_for(ack.message_id, "typo@users.test"),
                            mail_from="")
    assert code == 250 and "note" in text
    [ticket] = tickets(app)
    note = ticket["articles"][-1]
    assert note["kind"] == "internal"
    assert "5.1.1" in note["body"]
    [customer] = [p for p in ticket["participants"] if p["address"] == "typo@users.test"]
    assert customer["bouncing"] == "5.1.1"
    assert len(rows(app)) == before  # a report never causes mail (B17)


async def test_unmatched_report_creates_nothing(app: App) -> None:
    code, text = await send(port(app), dsn_for("unknown@elsewhere.test", "x@users.test"),
                            mail_from="")
    assert code == 250 and "ignored" in text
    assert tickets(app) == []
    with app.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Article)) == 0


async def test_burst_from_one_sender_caps_acknowledgements(app: App) -> None:
    for i in range(30):
        code, _ = await send(port(app), make_mail(f"Burst {i}"))
        assert code == 250
    assert len(tickets(app)) == 30  # every message is stored
    acks = rows(app, "ack")
    assert len(acks) == app.settings.outbound.auto_mail_per_hour == 10
    # Agents still hear of every ticket.
    assert len(rows(app, "notify")) == 30


async def test_rate_limit_window_slides(app: App, clock: Any) -> None:
    for i in range(11):
        await send(port(app), make_mail(f"First hour {i}"))
    assert len(rows(app, "ack")) == 10
    clock.advance(hours=1, seconds=1)
    await send(port(app), make_mail("Next hour"))
    assert len(rows(app, "ack")) == 11


async def test_out_of_office_subject_alone_is_not_automatic(app: App) -> None:
    # A person's subject; B17 decides by headers, so this customer is acknowledged.
    await send(port(app), make_mail("Out of office: my auto-reply setting is lost"))
    assert len(rows(app, "ack")) == 1
