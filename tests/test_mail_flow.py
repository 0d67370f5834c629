"""End to end over real SMTP: a client sends to the daemon, an aiosmtpd sink is the smarthost.

Covers the core mail path of BEHAVIOUR.md: B1-B10 and B20-B24.
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import func, select
from support.mailer import make_mail, send, send_raw_session
from support.sink import SmtpSink

from gateway.cli import ticket_detail
from gateway.daemon import App
from gateway.store.models import Article, OutboxRow, QuarantineRow, Ticket


def port(app: App) -> int:
    return app.channels[0].port  # type: ignore[attr-defined,no-any-return]


def count(app: App, model: Any) -> int:
    with app.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def only_ticket(app: App) -> dict[str, Any]:
    with app.sessions() as s:
        numbers = list(s.scalars(select(Ticket.number)))
    assert len(numbers) == 1, numbers
    data = ticket_detail(app, numbers[0])
    assert data is not None
    return data


def parsed(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def by_recipient(sink: SmtpSink, address: str) -> list[EmailMessage]:
    return [parsed(m.raw) for m in sink.messages if address in m.rcpt_tos]


async def test_new_ticket_acknowledged_and_agents_notified(app: App, sink: SmtpSink) -> None:
    raw = make_mail("Cannot log in to the portal", message_id="<first@users.test>")
    code, text = await send(port(app), raw)
    assert code == 250 and "created" in text
    ticket = only_ticket(app)
    hook = f"[Ticket#{ticket['number']}]"
    # B5: state new, priority normal, no owner, customer is the From address.
    assert (ticket["state"], ticket["priority"], ticket["owner"]) == ("new", "normal", None)
    assert ticket["customer"] == "dana@users.test"
    assert ticket["group"] == "First Line"
    assert ticket["number"].startswith("20261127")  # date-based numbering
    await sink.wait_for(2)
    [ack] = by_recipient(sink, "dana@users.test")
    # B6/B1: from the inbound address, auto-replied, threaded, hook + subject.
    assert ack["From"].addresses[0].addr_spec == "help@helpdesk.test"
    assert ack["Auto-Submitted"] == "auto-replied"
    assert ack["In-Reply-To"] == "<first@users.test>"
    assert ack["Subject"] == f"{hook} Cannot log in to the portal"
    [note] = by_recipient(sink, "alice@agents.test")
    # B7: hook, tokened Reply-To, auto-generated, the customer's text.
    assert hook in note["Subject"]
    reply_to = note["Reply-To"].addresses[0].addr_spec
    assert reply_to.startswith(f"help+{ticket['number']}.")
    assert note["Auto-Submitted"] == "auto-generated"
    assert "I cannot log in to the portal" in note.get_content()
    # Acknowledgements and notifications are not articles (B6).
    assert len(ticket["articles"]) == 1
    # Envelope sender is an address the daemon accepts mail at (B23).
    assert all(m.mail_from == "help@helpdesk.test" for m in sink.messages)


async def test_rule_routes_and_sets_priority(app: App, sink: SmtpSink) -> None:
    await send(port(app), make_mail("URGENT: Catalogue entry is wrong"))
    ticket = only_ticket(app)
    assert ticket["group"] == "Catalogue Support"
    routed = [e for e in ticket["events"] if e["kind"] == "routed"][0]
    assert [t["rule"] for t in routed["data"]["trail"]] == ["catalogue"]
    await sink.wait_for(3)
    assert by_recipient(sink, "bob@agents.test") and by_recipient(sink, "carol@agents.test")
    assert not by_recipient(sink, "alice@agents.test")


async def test_regex_rule_uses_word_boundaries(app: App) -> None:
    await send(port(app), make_mail("this is urgent please"))
    await send(port(app), make_mail("nonurgently asking"))
    with app.sessions() as s:
        prios = list(s.scalars(select(Ticket.priority).order_by(Ticket.id)))
    assert prios == ["high", "normal"]


async def test_envelope_recipient_decides_default_group(app: App) -> None:
    # B2: To says help@, the envelope says catalogue@: the envelope wins.
    raw = make_mail("Question", to="help@helpdesk.test")
    await send(port(app), raw, rcpt_to=("catalogue@helpdesk.test",))
    assert only_ticket(app)["group"] == "Catalogue Support"


async def test_first_configured_inbound_address_wins(app: App) -> None:
    raw = make_mail("Question", to="catalogue@helpdesk.test")
    await send(port(app), raw, rcpt_to=("catalogue@helpdesk.test", "help@helpdesk.test"))
    ticket = only_ticket(app)
    assert ticket["group"] == "First Line"
    assert ticket["inbound_address"] == "help@helpdesk.test"


async def test_drop_rule_accepts_and_stores_nothing(app: App) -> None:
    raw = make_mail("Buy now", headers={"X-Spam-Flag": "YES"})
    code, text = await send(port(app), raw)
    assert code == 250 and "dropped" in text
    assert count(app, Ticket) == 0
    assert count(app, OutboxRow) == 0
    assert count(app, QuarantineRow) == 0


async def test_participants_exclude_own_agents_and_bcc(app: App) -> None:
    raw = make_mail(
        "Access", to="help@helpdesk.test, Eve <eve@users.test>",
        cc="alice@agents.test, frank@users.test, catalogue@helpdesk.test",
    )
    # gina@ is an envelope-only (Bcc) recipient: never a participant.
    await send(port(app), raw, rcpt_to=("help@helpdesk.test",))
    ticket = only_ticket(app)
    assert {p["address"] for p in ticket["participants"]} == {
        "dana@users.test", "eve@users.test", "frank@users.test"}


async def test_mail_without_message_id_or_date_is_a_ticket(app: App) -> None:
    raw = make_mail("From a script", message_id=None, date=False)
    code, _ = await send(port(app), raw)
    assert code == 250
    assert only_ticket(app)["state"] == "new"


async def test_followup_by_hook_from_participant_appends(app: App, sink: SmtpSink) -> None:
    await send(port(app), make_mail("Printer on fire", cc="eve@users.test"))
    number = only_ticket(app)["number"]
    await sink.wait_for(2)
    # Reply prefixes in any language are irrelevant (B8); Cc participant may follow up.
    raw = make_mail(f"AW: Re: [Ticket#{number}] Printer on fire", body="Still burning.",
                    sender="Eve <EVE@users.test>")
    code, text = await send(port(app), raw, mail_from="eve@users.test")
    assert code == 250 and "followup" in text and number in text
    ticket = only_ticket(app)
    assert [a["body"].strip() for a in ticket["articles"]][1] == "Still burning."
    # B7: each non-automatic customer follow-up notifies the group's agents.
    await sink.wait_for(3)
    assert len(by_recipient(sink, "alice@agents.test")) == 2


async def test_followup_by_references_to_acknowledgement(app: App, sink: SmtpSink) -> None:
    await send(port(app), make_mail("VPN broken"))
    await sink.wait_for(2)
    [ack] = by_recipient(sink, "dana@users.test")
    raw = make_mail("Re: your message", body="More detail.", in_reply_to=ack["Message-ID"],
                    references=ack["Message-ID"])
    await send(port(app), raw)
    ticket = only_ticket(app)
    assert len(ticket["articles"]) == 2


async def test_hook_from_stranger_opens_linked_ticket(app: App) -> None:
    await send(port(app), make_mail("Original problem"))
    number = only_ticket(app)["number"]
    raw = make_mail(f"Re: [Ticket#{number}] Original problem", sender="mallory@evil.test")
    await send(port(app), raw, mail_from="mallory@evil.test")
    with app.sessions() as s:
        numbers = list(s.scalars(select(Ticket.number).order_by(Ticket.id)))
    assert len(numbers) == 2
    second = ticket_detail(app, numbers[1])
    assert second is not None and second["linked_ticket"] == number
    first = ticket_detail(app, number)
    assert first is not None and len(first["articles"]) == 1


async def test_duplicate_message_id_to_two_addresses_gives_one_article(app: App) -> None:
    raw = make_mail("Twice", message_id="<dup@users.test>")
    await send(port(app), raw, rcpt_to=("help@helpdesk.test",))
    code, text = await send(port(app), raw, rcpt_to=("catalogue@helpdesk.test",))
    assert code == 250 and "duplicate" in text
    assert count(app, Ticket) == 1
    assert count(app, Article) == 1


async def test_customer_followup_reopens_closed_ticket(app: App) -> None:
    await send(port(app), make_mail("Closed soon"))
    number = only_ticket(app)["number"]
    with app.sessions() as s, s.begin():
        t = s.scalars(select(Ticket)).one()
        t.state = "closed"
    await send(port(app), make_mail(f"Re: [Ticket#{number}] Closed soon", body="Again!"))
    assert only_ticket(app)["state"] == "open"


async def test_automatic_followup_does_not_reopen(app: App, sink: SmtpSink) -> None:
    await send(port(app), make_mail("Closed for good"))
    number = only_ticket(app)["number"]
    await sink.wait_for(2)
    with app.sessions() as s, s.begin():
        s.scalars(select(Ticket)).one().state = "closed"
    raw = make_mail(f"Automatic reply: [Ticket#{number}] Closed for good",
                    headers={"Auto-Submitted": "auto-replied"})
    await send(port(app), raw)
    ticket = only_ticket(app)
    assert ticket["state"] == "closed"
    assert len(ticket["articles"]) == 2
    assert count(app, OutboxRow) == 2  # still just the first ack and notification


async def test_oversized_message_refused_with_552(app: App) -> None:
    raw = make_mail("Huge", body="x" * 70 + "\n" * 1 + ("y" * 76 + "\n") * 3000)
    try:
        await send(port(app), raw)
    except aiosmtplib.SMTPResponseException as exc:
        assert exc.code == 552
    else:
        raise AssertionError("a message over the size limit was accepted")
    assert count(app, Ticket) == 0


async def test_ehlo_advertises_size(app: App) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port(app), timeout=10)
    await client.connect()
    await client.ehlo()
    assert client.esmtp_extensions["size"] == "200000"
    await client.quit()


async def test_no_open_relay(app: App) -> None:
    raw = make_mail("Relay?", to="someone@elsewhere.test")
    results = await send_raw_session(port(app), [
        ("mail", "dana@users.test"),
        ("rcpt", "someone@elsewhere.test"),
        ("rcpt", "help@helpdesk.test"),
        ("data", raw),
    ])
    _mail, refused, accepted, data = results
    assert isinstance(refused, aiosmtplib.SMTPResponseException)
    assert refused.code == 550 and "5.1.1" in refused.message
    assert accepted.code == 250
    assert data.code == 250
    assert count(app, Ticket) == 1


async def test_subaddress_of_inbound_is_accepted(app: App) -> None:
    code, _ = await send(port(app), make_mail("Sub"), rcpt_to=("help+anything@helpdesk.test",))
    assert code == 250
    assert only_ticket(app)["inbound_address"] == "help@helpdesk.test"


async def test_header_injection_through_subject_and_name(app: App, sink: SmtpSink) -> None:
    # Written by hand: the stdlib refuses to build such headers, attackers do not.
    raw = (
        b"From: =?utf-8?q?Dana=0D=0ABcc:_x@evil.test?= <dana@users.test>\r\n"
        b"To: help@helpdesk.test\r\n"
        b"Subject: =?utf-8?q?Hello=0D=0ABcc:_victim@evil.test?=\r\n"
        b"Message-ID: <inject@users.test>\r\n"
        b"\r\n"
        b"Hi\r\n"
    )
    await send(port(app), raw)
    await sink.wait_for(2)
    for m in sink.messages:
        assert set(m.rcpt_tos) <= {"dana@users.test", "alice@agents.test"}
        head = m.raw.split(b"\r\n\r\n", 1)[0]
        assert b"\nBcc:" not in head
        for line in head.split(b"\r\n"):
            assert len(line) <= 998
            assert all(b < 128 for b in line)


async def test_non_ascii_subject_round_trips(app: App, sink: SmtpSink) -> None:
    await send(port(app), make_mail("Zugriff verweigert – Straße ünd 日本語"))
    await sink.wait_for(2)
    [ack] = by_recipient(sink, "dana@users.test")
    assert ack["Subject"].endswith("Zugriff verweigert – Straße ünd 日本語")


async def test_store_failure_answers_451_and_keeps_nothing(app: App, tmp_path: Any) -> None:
    from sqlalchemy import create_engine

    from gateway.store.db import make_sessionmaker

    # A real store that cannot be written: the database file's directory is a file.
    (tmp_path / "blocker").write_text("not a directory")
    broken = create_engine(f"sqlite:///{tmp_path / 'blocker' / 'db.sqlite3'}")
    good = app.intake.sessions
    app.intake.sessions = make_sessionmaker(broken)
    try:
        try:
            await send(port(app), make_mail("Lost?"))
        except aiosmtplib.SMTPResponseException as exc:
            assert exc.code == 451 and "4.3.0" in exc.message
        else:
            raise AssertionError("store failure was acknowledged with 250")
    finally:
        app.intake.sessions = good
        broken.dispose()
    assert count(app, Ticket) == 0
    # The sender retries; now it is stored.
    code, _ = await send(port(app), make_mail("Lost?"))
    assert code == 250 and count(app, Ticket) == 1


async def test_unparseable_message_is_quarantined_not_lost(app: App) -> None:
    code, text = await send(port(app), b"\x00\x01\x02 binary junk that is no mail\r\n")
    assert code == 250 and "quarantined" in text
    with app.sessions() as s:
        q = s.scalars(select(QuarantineRow)).one()
    assert q.stage == "parse" and q.reason
    assert q.raw.startswith(b"\x00\x01\x02")


@pytest.fixture
def tls_pair(tmp_path: Any) -> tuple[Any, Any]:
    """A throw-away self-signed certificate and key."""
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=helpdesk.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


async def test_starttls_when_configured(tmp_path: Any, db_url: str, sink: SmtpSink,
                                        clock: Any, tls_pair: tuple[Any, Any]) -> None:
    import ssl

    from support.app import demo_config

    from gateway.config import parse_settings
    from gateway.mail.transport import SmtpTransport

    cert, key = tls_pair
    data = demo_config(tmp_path, db_url, smtp={"tls_cert": str(cert), "tls_key": str(key)})
    settings = parse_settings(data, base_dir=tmp_path, environ={})
    app = App(settings, clock=clock, transport=SmtpTransport(
        "127.0.0.1", sink.port, starttls=False, username="", password="", timeout=5))
    await app.start()
    try:
        context = ssl.create_default_context(cafile=str(cert))
        context.check_hostname = False
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port(app), timeout=10,
                                 tls_context=context, start_tls=False)
        await client.connect()
        await client.ehlo()
        assert client.supports_extension("starttls")
        await client.starttls()
        assert client.transport is not None
        assert client.transport.get_extra_info("ssl_object") is not None
        await client.sendmail("dana@users.test", ["help@helpdesk.test"], make_mail("Over TLS"))
        await client.quit()
        assert count(app, Ticket) == 1
    finally:
        await app.stop()
