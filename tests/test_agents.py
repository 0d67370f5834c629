"""Agents work purely by email (B11-B16): replies relayed, commands applied, errors mailed.

Every reply here is built from the notification the daemon actually sent to the
sink, the way a mail client would: To the notification's Reply-To, the quoted
notification below the new text.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import func, select
from support.mailer import make_mail, send
from support.sink import SmtpSink

from gateway.cli import ticket_detail
from gateway.daemon import App
from gateway.followup import make_token, reply_address
from gateway.store.models import OutboxRow, Ticket

CUSTOMER_TEXT = "Hello, the catalogue search returns nothing since Monday."


def port(app: App) -> int:
    return app.channels[0].port  # type: ignore[attr-defined,no-any-return]


def parsed(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def mails_to(sink: SmtpSink, address: str) -> list[EmailMessage]:
    return [parsed(m.raw) for m in sink.messages if address in m.rcpt_tos]


def ticket(app: App, number: str | None = None) -> dict[str, Any]:
    if number is None:
        with app.sessions() as s:
            number = s.scalars(select(Ticket.number).order_by(Ticket.id.desc())).first()
    assert number is not None
    data = ticket_detail(app, number)
    assert data is not None
    return data


def outbox_count(app: App) -> int:
    with app.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(OutboxRow)) or 0)


async def open_ticket(
    app: App, sink: SmtpSink, subject: str = "Search broken", agent: str = "alice@agents.test",
    **kw: Any,
) -> tuple[dict[str, Any], EmailMessage]:
    """A customer writes in; returns the ticket and the notification `agent` received."""
    before = len(sink.messages)
    await send(port(app), make_mail(subject, CUSTOMER_TEXT + "\n", **kw))
    t = ticket(app)
    group = app.settings.group(t["group"])
    assert group is not None
    expected = 1 + len(group.agents)
    await sink.wait_for(before + expected)
    notes = [m for m in mails_to(sink, agent) if f"[Ticket#{t['number']}]" in m["Subject"]]
    assert notes, f"{agent} got no notification"
    return t, notes[-1]


def gmail_reply(note: EmailMessage, agent: str, text: str, name: str = "Alice") -> bytes:
    quoted = "\n".join("> " + line for line in note.get_content().splitlines())
    attribution = "On Fri, 27 Nov 2026 at 10:00, EOSC Helpdesk <help@helpdesk.test> wrote:"
    body = f"{text}\n\n{attribution}\n{quoted}\n"
    return make_mail(
        "Re: " + str(note["Subject"]), body, sender=f"{name} <{agent}>",
        to=note["Reply-To"].addresses[0].addr_spec, in_reply_to=note["Message-ID"],
        references=note["Message-ID"],
    )


def outlook_reply(note: EmailMessage, agent: str, text: str) -> bytes:
    body = (
        f"{text}\n\n"
        "________________________________\n"
        "From: EOSC Helpdesk <help@helpdesk.test>\n"
        "Sent: Friday, November 27, 2026 10:00 AM\n"
        f"To: {agent}\n"
        f"Subject: {note['Subject']}\n\n"
        f"{note.get_content()}\n"
    )
    return make_mail("RE: " + str(note["Subject"]), body, sender=agent,
                     to=note["Reply-To"].addresses[0].addr_spec)


async def reply(app: App, note: EmailMessage, raw: bytes, agent: str) -> str:
    token_address = note["Reply-To"].addresses[0].addr_spec
    code, text = await send(port(app), raw, mail_from=agent, rcpt_to=(token_address,))
    assert code == 250
    return text


@pytest.mark.parametrize("style", ["gmail", "outlook"])
async def test_agent_reply_is_relayed_without_quotes(app: App, sink: SmtpSink, style: str) -> None:
    t, note = await open_ticket(app, sink, cc="eve@users.test")
    [original] = [a for a in t["articles"]]
    agent = "alice@agents.test"
    answer = "Thanks, we re-indexed the catalogue. Please try again."
    raw = gmail_reply(note, agent, answer) if style == "gmail" else outlook_reply(
        note, agent, answer)
    before = len(sink.messages)
    result = await reply(app, note, raw, agent)
    assert "agent-reply" in result
    await sink.wait_for(before + 1)
    [relay] = [parsed(m.raw) for m in sink.messages[before:]]
    relay_raw = sink.messages[before].raw.decode("ascii")
    # B14: To the customer, Cc the other participants, From the inbound address.
    assert [a.addr_spec for a in relay["To"].addresses] == ["dana@users.test"]
    assert [a.addr_spec for a in relay["Cc"].addresses] == ["eve@users.test"]
    sender = relay["From"].addresses[0]
    assert sender.addr_spec == "help@helpdesk.test"
    assert sender.display_name == "Alice via EOSC Helpdesk"
    assert relay["In-Reply-To"] == f"<{original['message_id']}>"
    assert relay["Auto-Submitted"] is None
    assert f"[Ticket#{t['number']}]" in relay["Subject"]
    body = relay.get_content()
    assert answer in body
    # The customer never sees the agent's address, the token or the quoted notification.
    assert agent not in relay_raw and "alice@" not in body
    assert "help+" not in relay_raw
    assert CUSTOMER_TEXT not in body and "Reply to this mail" not in body
    after = ticket(app, t["number"])
    assert after["state"] == "open"  # B10: first relayed reply moves new -> open
    assert after["first_response_at"] is not None
    [article] = [a for a in after["articles"] if a["author_role"] == "agent"]
    assert article["kind"] == "public" and article["body"].strip() == answer


async def test_a_forwarded_notification_does_not_carry_the_token_to_the_customer(
    app: App, sink: SmtpSink
) -> None:
    """B14: the agent attaches the notification they got (its Reply-To has their
    token) and pastes their reply address into the text; the relay has neither."""
    t, note = await open_ticket(app, sink)
    token_address = note["Reply-To"].addresses[0].addr_spec
    reply_mail = parsed(gmail_reply(
        note, "alice@agents.test", f"See below; I answer from {token_address.upper()}."))
    reply_mail.add_attachment(note)  # as message/rfc822
    before = len(sink.messages)
    assert "agent-reply" in await reply(app, note, reply_mail.as_bytes(), "alice@agents.test")
    await sink.wait_for(before + 1)
    relay_raw = sink.messages[before].raw
    assert tuple(sink.messages[before].rcpt_tos) == ("dana@users.test",)
    token = token_address.split("+", 1)[1].split("@")[0].split(".")[1]
    assert token.encode() not in relay_raw.lower()
    relay = parsed(relay_raw)
    assert "I answer from HELP@HELPDESK.TEST." in relay.get_body(("plain",)).get_content()
    [forwarded] = [p for p in relay.iter_attachments()]
    assert forwarded.get_content_type() == "message/rfc822"
    assert forwarded.get_content()["Reply-To"].addresses[0].addr_spec == "help@helpdesk.test"


async def test_commands_change_the_ticket(app: App, sink: SmtpSink) -> None:
    t, note = await open_ticket(app, sink)
    body = "#priority high\n#assign me\n#pending 2026-12-01\n\nWe are on it."
    before = len(sink.messages)
    await reply(app, note, gmail_reply(note, "alice@agents.test", body), "alice@agents.test")
    after = ticket(app, t["number"])
    assert (after["priority"], after["owner"], after["state"]) == (
        "high", "alice@agents.test", "pending")
    kinds = [e["kind"] for e in after["events"]]
    assert {"command:priority", "command:assign", "command:pending"} <= set(kinds)
    pending = [e for e in after["events"] if e["kind"] == "command:pending"][0]
    assert pending["actor"] == "alice@agents.test"
    assert pending["data"]["until"].startswith("2026-12-01")
    await sink.wait_for(before + 1)
    [relay] = [parsed(m.raw) for m in sink.messages[before:]]
    text = relay.get_content()
    assert "We are on it." in text and "#priority" not in text


async def test_close_without_text_relays_nothing(app: App, sink: SmtpSink) -> None:
    t, note = await open_ticket(app, sink)
    rows = outbox_count(app)
    await reply(app, note, gmail_reply(note, "alice@agents.test", "#close"), "alice@agents.test")
    after = ticket(app, t["number"])
    assert after["state"] == "closed" and after["closed_at"]
    assert len(after["articles"]) == 1  # empty reply text: no article (B14)
    assert outbox_count(app) == rows  # no relay, no confirmation to the agent


async def test_note_is_internal_and_not_relayed(app: App, sink: SmtpSink) -> None:
    t, note = await open_ticket(app, sink)
    rows = outbox_count(app)
    body = "#note\n#priority low\n\nCustomer is on the old client; do not tell them yet."
    await reply(app, note, gmail_reply(note, "alice@agents.test", body), "alice@agents.test")
    after = ticket(app, t["number"])
    [article] = [a for a in after["articles"] if a["author_role"] == "agent"]
    assert article["kind"] == "internal"
    assert after["priority"] == "low"  # other commands still run (B15)
    assert after["state"] == "new"  # nothing was relayed
    assert outbox_count(app) == rows


async def test_group_move_notifies_new_group(app: App, sink: SmtpSink) -> None:
    t, note = await open_ticket(app, sink)
    before = len(sink.messages)
    await reply(app, note, gmail_reply(note, "alice@agents.test", "#group Catalogue Support"),
                "alice@agents.test")
    after = ticket(app, t["number"])
    assert after["group"] == "Catalogue Support"
    await sink.wait_for(before + 2)
    new = [parsed(m.raw) for m in sink.messages[before:]]
    assert sorted(m["To"].addresses[0].addr_spec for m in new) == [
        "bob@agents.test", "carol@agents.test"]
    assert all("moved to Catalogue Support" in m.get_content() for m in new)


async def test_cc_command_adds_participant(app: App, sink: SmtpSink) -> None:
    t, note = await open_ticket(app, sink)
    before = len(sink.messages)
    raw = gmail_reply(note, "alice@agents.test", "#cc Boss <boss@users.test>\n\nDone.")
    await reply(app, note, raw, "alice@agents.test")
    # "Boss <boss@...>" is not a bare address: the whole reply is refused.
    await sink.wait_for(before + 1)
    assert ticket(app, t["number"])["participants"] == [
        p for p in t["participants"]]
    # Neither the helpdesk's own addresses nor agents become participants (B5).
    for own in ("help@helpdesk.test", "Bob@agents.test"):
        before = len(sink.messages)
        raw = gmail_reply(note, "alice@agents.test", f"#cc {own}\n\nDone.")
        assert "rejected" in await reply(app, note, raw, "alice@agents.test")
        await sink.wait_for(before + 1)
        assert f"#cc {own}: is " in parsed(sink.messages[-1].raw).get_content()
    assert ticket(app, t["number"])["participants"] == t["participants"]
    raw = gmail_reply(note, "alice@agents.test", "#cc boss@users.test\n\nDone.")
    before = len(sink.messages)
    await reply(app, note, raw, "alice@agents.test")
    await sink.wait_for(before + 1)
    relay = parsed(sink.messages[-1].raw)
    assert [a.addr_spec for a in relay["Cc"].addresses] == ["boss@users.test"]


async def test_bad_command_changes_nothing_and_mails_the_agent(app: App, sink: SmtpSink) -> None:
    t, note = await open_ticket(app, sink)
    before = len(sink.messages)
    body = "#priority high\n#frobnicate now\n#group Nonexistent\n\nShould not be sent."
    result = await reply(app, note, gmail_reply(note, "alice@agents.test", body),
                         "alice@agents.test")
    assert "rejected" in result
    after = ticket(app, t["number"])
    assert after["priority"] == "normal" and after["group"] == "First Line"
    assert len(after["articles"]) == 1
    await sink.wait_for(before + 1)
    [error] = [parsed(m.raw) for m in sink.messages[before:]]
    assert error["To"].addresses[0].addr_spec == "alice@agents.test"
    text = error.get_content()
    assert "#frobnicate now: unknown command" in text
    assert "#group Nonexistent" in text
    assert "#close" in text and "#assign" in text  # the valid commands are listed
    assert "dana@users.test" not in [m.rcpt_tos[0] for m in sink.messages[before:]]


async def test_unauthorised_agent_gets_error_and_nothing_happens(
    app: App, sink: SmtpSink
) -> None:
    # Bob's notification came while the ticket was Catalogue's; then it moved to First Line.
    t, bob_note = await open_ticket(app, sink, subject="Catalogue down", agent="bob@agents.test")
    carol_note = mails_to(sink, "carol@agents.test")[-1]
    moved = len(sink.messages)
    await reply(app, carol_note, gmail_reply(carol_note, "carol@agents.test",
                                             "#group First Line", "Carol"), "carol@agents.test")
    await sink.wait_for(moved + 1)  # Alice is told of the move
    before = len(sink.messages)
    result = await reply(app, bob_note, gmail_reply(bob_note, "bob@agents.test",
                                                    "#close\n\nBye", "Bob"), "bob@agents.test")
    assert "rejected" in result
    after = ticket(app, t["number"])
    assert after["state"] == "new" and after["group"] == "First Line"
    await sink.wait_for(before + 1)
    [error] = [parsed(m.raw) for m in sink.messages[before:]]
    assert error["To"].addresses[0].addr_spec == "bob@agents.test"
    assert "not an agent of 'First Line'" in error.get_content()


async def test_forged_from_runs_nothing_and_sends_nothing(
    app: App, sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    t, note = await open_ticket(app, sink)
    rows = outbox_count(app)
    # Mallory knows Alice's address but not her token: he uses a made-up one.
    fake = reply_address("help@helpdesk.test", t["number"], "a" * 20)
    raw = make_mail("Re: x", "#close\n\nClosed, bye.", sender="alice@agents.test", to=fake)
    with caplog.at_level(logging.WARNING, logger="gateway.security"):
        code, text = await send(port(app), raw, mail_from="mallory@evil.test", rcpt_to=(fake,))
    assert code == 250 and "note" in text
    after = ticket(app, t["number"])
    assert after["state"] == "new"
    assert outbox_count(app) == rows
    [kept] = [a for a in after["articles"] if a["kind"] == "internal"]
    assert "Closed, bye." in kept["body"]
    assert any("invalid token" in r.getMessage() for r in caplog.records)


async def test_token_mail_from_non_agent_is_an_internal_note(app: App, sink: SmtpSink) -> None:
    t, note = await open_ticket(app, sink)
    rows = outbox_count(app)
    raw = gmail_reply(note, "eve@users.test", "#close\n\nI am not an agent.", "Eve")
    await reply(app, note, raw, "eve@users.test")
    after = ticket(app, t["number"])
    assert after["state"] == "new" and outbox_count(app) == rows
    assert [a["kind"] for a in after["articles"]] == ["public", "internal"]


async def test_agent_mail_to_plain_address_runs_no_commands(app: App, sink: SmtpSink) -> None:
    t, _ = await open_ticket(app, sink)
    raw = make_mail(f"Re: [Ticket#{t['number']}] Search broken", "#close\n\nHello",
                    sender="alice@agents.test")
    await send(port(app), raw, mail_from="alice@agents.test")
    after = ticket(app, t["number"])
    assert after["state"] == "new"
    assert len(after["articles"]) == 2


async def test_command_header_for_scripts(app: App, sink: SmtpSink) -> None:
    t, note = await open_ticket(app, sink)
    raw = gmail_reply(note, "alice@agents.test", "Closing as agreed.")
    raw = b"X-Helpdesk-Command: #priority high; #close\r\n" + raw
    await reply(app, note, raw, "alice@agents.test")
    after = ticket(app, t["number"])
    assert (after["priority"], after["state"]) == ("high", "closed")


async def test_hash_line_after_text_is_text(app: App, sink: SmtpSink) -> None:
    t, note = await open_ticket(app, sink)
    body = "\n\n#priority high\nLine one.\n#close is what I will do later\n"
    await reply(app, note, gmail_reply(note, "alice@agents.test", body), "alice@agents.test")
    after = ticket(app, t["number"])
    assert after["priority"] == "high" and after["state"] == "open"
    [article] = [a for a in after["articles"] if a["author_role"] == "agent"]
    assert "#close is what I will do later" in article["body"]


async def test_token_is_bound_to_ticket_and_agent(settings: Any) -> None:
    secret = settings.daemon.secret.get_secret_value().encode()
    a = make_token(secret, "2026112700001", "alice@agents.test")
    assert a != make_token(secret, "2026112700002", "alice@agents.test")
    assert a != make_token(secret, "2026112700001", "bob@agents.test")
    assert a == make_token(secret, "2026112700001", "ALICE@agents.test")


async def test_attachments_of_agent_reply_go_along(app: App, sink: SmtpSink) -> None:
    t, note = await open_ticket(app, sink)
    msg = email.message_from_bytes(
        gmail_reply(note, "alice@agents.test", "Here is the fixed config."),
        policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    msg.add_attachment(b"key = value\n\x00binary", maintype="application",
                       subtype="octet-stream", filename="fixed.conf")
    before = len(sink.messages)
    await reply(app, note, msg.as_bytes(), "alice@agents.test")
    await sink.wait_for(before + 1)
    relay = parsed(sink.messages[before].raw)
    [att] = list(relay.iter_attachments())
    assert att.get_filename() == "fixed.conf"
    assert att.get_content() == b"key = value\n\x00binary"


async def test_a_file_sent_without_words_is_relayed(app: App, sink: SmtpSink) -> None:
    t, note = await open_ticket(app, sink)
    msg = email.message_from_bytes(gmail_reply(note, "alice@agents.test", ""),
                                   policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    msg.add_attachment(b"\x89PNG screenshot", maintype="image", subtype="png",
                       filename="screen.png")
    before = len(sink.messages)
    await reply(app, note, msg.as_bytes(), "alice@agents.test")
    await sink.wait_for(before + 1)
    relay = parsed(sink.messages[before].raw)
    assert relay["To"].addresses[0].addr_spec == "dana@users.test"
    [att] = list(relay.iter_attachments())
    assert (att.get_filename(), att.get_content()) == ("screen.png", b"\x89PNG screenshot")
    [_, answer] = ticket(app, t["number"])["articles"]
    assert (answer["kind"], answer["author_role"]) == ("public", "agent")
    assert [a["filename"] for a in answer["attachments"]] == ["screen.png"]


async def test_a_signature_logo_alone_is_no_reply(app: App, sink: SmtpSink) -> None:
    t, note = await open_ticket(app, sink)
    msg = email.message_from_bytes(gmail_reply(note, "alice@agents.test", "#close"),
                                   policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    msg.add_attachment(b"\x89PNG logo", maintype="image", subtype="png", filename="logo.png",
                       disposition="inline", cid="<logo@agents.test>")
    rows = outbox_count(app)
    await reply(app, note, msg.as_bytes(), "alice@agents.test")
    after = ticket(app, t["number"])
    assert after["state"] == "closed" and len(after["articles"]) == 1
    assert outbox_count(app) == rows


@pytest.mark.parametrize("ctype", ["application/pkcs7-signature", "application/pgp-signature"])
async def test_a_signed_commands_only_reply_is_no_reply(
    app: App, sink: SmtpSink, ctype: str
) -> None:
    t, note = await open_ticket(app, sink)
    msg = email.message_from_bytes(gmail_reply(note, "alice@agents.test", "#close"),
                                   policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    maintype, subtype = ctype.split("/")
    msg.add_attachment(b"signature bytes", maintype=maintype, subtype=subtype,
                       filename="smime.p7s" if "pkcs7" in ctype else "signature.asc")
    rows = outbox_count(app)
    await reply(app, note, msg.as_bytes(), "alice@agents.test")
    after = ticket(app, t["number"])
    assert after["state"] == "closed" and len(after["articles"]) == 1
    assert outbox_count(app) == rows


async def test_html_only_reply_is_stripped_of_the_quote(app: App, sink: SmtpSink) -> None:
    t, note = await open_ticket(app, sink)
    html = (
        "<html><body><div>Please restart the <b>indexer</b>.</div>"
        "<div class=\"gmail_quote\">On Fri, EOSC Helpdesk wrote:<blockquote>"
        f"{CUSTOMER_TEXT}<br>Reply to this mail to answer the customer.</blockquote></div>"
        "</body></html>"
    )
    msg = EmailMessage()
    msg["From"] = "Alice <alice@agents.test>"
    msg["To"] = note["Reply-To"].addresses[0].addr_spec
    msg["Subject"] = "Re: " + str(note["Subject"])
    msg["Message-ID"] = "<html-reply@agents.test>"
    msg.set_content(html, subtype="html")
    before = len(sink.messages)
    await reply(app, note, msg.as_bytes(), "alice@agents.test")
    await sink.wait_for(before + 1)
    text = parsed(sink.messages[before].raw).get_content()
    assert "Please restart the indexer." in text
    assert CUSTOMER_TEXT not in text


@pytest.mark.parametrize("body", ["#close.\n\nThanks, closing.",
                                  "#close\n#note:\nInternal: customer is difficult."])
async def test_mistyped_command_rejects_the_whole_reply(
    app: App, sink: SmtpSink, body: str
) -> None:
    t, note = await open_ticket(app, sink)
    before = len(sink.messages)
    result = await reply(app, note, gmail_reply(note, "alice@agents.test", body),
                         "alice@agents.test")
    assert "rejected" in result
    after = ticket(app, t["number"])
    assert after["state"] == "new" and len(after["articles"]) == 1
    await sink.wait_for(before + 1)
    assert [m.rcpt_tos for m in sink.messages[before:]] == [("alice@agents.test",)]
    assert "unknown command" in parsed(sink.messages[before].raw).get_content()


async def test_reply_to_an_unwritable_customer_is_reported_to_the_agent(
    app: App, sink: SmtpSink, clock: Any
) -> None:
    from gateway.message import Channel, Inbound

    # SMTPUTF8 lets a customer with a non-ASCII local part in; our outbound mail
    # cannot address them (no SMTPUTF8 outbound), so nothing could be relayed.
    raw = ("From: Jörg <jörg@bücher.test>\r\nTo: help@helpdesk.test\r\n"
           "Subject: Umlaut\r\nMessage-ID: <eai@bücher.test>\r\n\r\nHallo\r\n").encode()
    await asyncio.to_thread(app.intake.ingest_now, Inbound(
        Channel.EMAIL, raw, clock.now, "smtp", "jörg@bücher.test", ("help@helpdesk.test",)))
    await sink.wait_for(1)  # only Alice's notification: the acknowledgement cannot go
    note = mails_to(sink, "alice@agents.test")[-1]
    before = len(sink.messages)
    await reply(app, note, gmail_reply(note, "alice@agents.test", "Hallo Jörg!"),
                "alice@agents.test")
    await sink.wait_for(before + 1)
    [failure] = [parsed(m.raw) for m in sink.messages[before:]]
    assert failure["To"].addresses[0].addr_spec == "alice@agents.test"
    assert "could not be sent" in failure.get_content()
    after = ticket(app)
    assert after["state"] == "new" and after["first_response_at"] is None
    assert "relay-undeliverable" in [e["kind"] for e in after["events"]]
