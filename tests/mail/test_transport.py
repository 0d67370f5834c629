"""Transports against real servers: an aiosmtpd sink on loopback, a Maildir on disk."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.policy
import logging
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest
from pydantic import SecretStr
from support.sink import SmtpSink, free_port

from gateway.config import OutboundSettings
from gateway.mail.compose import compose, make_message_id
from gateway.mail.transport import (
    DeliveryError,
    MaildirTransport,
    SmtpTransport,
    make_transport,
)
from gateway.message import Address, Attachment, Outbound

HELP = "help@helpdesk.test"
DANA = "dana@users.test"
EVE = "eve@users.test"


def composed(subject: str = "[Ticket#2026112700012] Grüße", **kw: object) -> bytes:
    fields: dict[str, object] = {
        "sender": Address(HELP, "EOSC Helpdesk"),
        "to": (Address(DANA, "Dana Müller"),),
        "subject": subject,
        "text": "Hello Dana,\n\n" + "line of text. " * 200 + "\n",
    }
    fields.update(kw)
    return compose(
        Outbound(**fields),  # type: ignore[arg-type]
        message_id=make_message_id("helpdesk.test"),
        date=dt.datetime(2026, 11, 27, 10, 0, tzinfo=dt.UTC),
        loop_value=HELP,
    )


def parse(raw: bytes) -> EmailMessage:
    msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


def smtp(port: int, **kw: object) -> SmtpTransport:
    options: dict[str, object] = {
        "starttls": False,
        "username": "",
        "password": "",
        "timeout": 5.0,
        "local_hostname": "helpdesk.test",
    }
    options.update(kw)
    return SmtpTransport("127.0.0.1", port, **options)  # type: ignore[arg-type]


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    async with SmtpSink() as s:
        yield s


@pytest.fixture
async def transport(sink: SmtpSink) -> AsyncIterator[SmtpTransport]:
    t = smtp(sink.port)
    yield t
    await t.close()


# -- SMTP ------------------------------------------------------------------------------------


async def test_send_delivers_bytes_and_envelope(sink: SmtpSink, transport: SmtpTransport) -> None:
    raw = composed(attachments=(Attachment("Bericht.pdf", "application/pdf", b"%PDF\x00"),))
    await transport.send(raw, HELP, [DANA, EVE])
    [got] = await sink.wait_for(1)
    assert got.mail_from == HELP
    assert got.rcpt_tos == (DANA, EVE)
    assert got.raw.rstrip(b"\r\n") == raw.rstrip(b"\r\n")
    assert got.message["Subject"] == "[Ticket#2026112700012] Grüße"
    assert got.message["Bcc"] is None
    [att] = list(got.message.iter_attachments())
    assert att.get_content() == b"%PDF\x00"


async def test_connection_is_reused(sink: SmtpSink, transport: SmtpTransport) -> None:
    for i in range(3):
        await transport.send(composed(f"message {i}"), HELP, [DANA])
    first, second, third = await sink.wait_for(3)
    assert sink.connections == 1
    assert first.peer == second.peer == third.peer


async def test_concurrent_sends_share_the_connection(
    sink: SmtpSink, transport: SmtpTransport
) -> None:
    await asyncio.gather(*(transport.send(composed(f"m{i}"), HELP, [DANA]) for i in range(5)))
    received = await sink.wait_for(5)
    assert sorted(m.message["Subject"] for m in received) == [f"m{i}" for i in range(5)]
    assert sink.connections == 1


async def test_reconnects_after_smarthost_dropped_connection(
    sink: SmtpSink, transport: SmtpTransport
) -> None:
    await transport.send(composed("before"), HELP, [DANA])
    sink.drop_connections()
    await transport.send(composed("after"), HELP, [DANA])
    before, after = await sink.wait_for(2)
    assert after.message["Subject"] == "after"
    assert sink.connections == 2
    assert before.peer != after.peer


@pytest.mark.parametrize("stage", ["mail", "data"])
@pytest.mark.parametrize("code", [421, 450, 451, 452])
async def test_4xx_is_temporary(
    sink: SmtpSink, transport: SmtpTransport, stage: str, code: int
) -> None:
    sink.fail_next(1, code, stage=stage)  # type: ignore[arg-type]
    with pytest.raises(DeliveryError) as info:
        await transport.send(composed(), HELP, [DANA])
    assert info.value.permanent is False
    assert info.value.code == code
    # The retry goes through (on the same connection unless the server said 421).
    await transport.send(composed(), HELP, [DANA])
    await sink.wait_for(1)
    assert sink.connections == (2 if code == 421 else 1)


@pytest.mark.parametrize("stage", ["mail", "data"])
@pytest.mark.parametrize("code", [550, 552, 554])
async def test_5xx_is_permanent(
    sink: SmtpSink, transport: SmtpTransport, stage: str, code: int
) -> None:
    sink.fail_next(1, code, stage=stage)  # type: ignore[arg-type]
    with pytest.raises(DeliveryError) as info:
        await transport.send(composed(), HELP, [DANA])
    assert info.value.permanent is True
    assert info.value.code == code
    assert str(code) in str(info.value)
    assert sink.messages == []


async def test_all_recipients_refused_5xx_is_permanent(
    sink: SmtpSink, transport: SmtpTransport
) -> None:
    sink.refuse(DANA, 550)
    sink.refuse(EVE, 553)
    with pytest.raises(DeliveryError) as info:
        await transport.send(composed(), HELP, [DANA, EVE])
    assert info.value.permanent is True
    assert DANA in str(info.value) and EVE in str(info.value)


async def test_all_recipients_refused_mixed_is_temporary(
    sink: SmtpSink, transport: SmtpTransport
) -> None:
    sink.refuse(DANA, 550)
    sink.refuse(EVE, 450)
    with pytest.raises(DeliveryError) as info:
        await transport.send(composed(), HELP, [DANA, EVE])
    assert info.value.permanent is False


async def test_partial_refusal_counts_as_sent(
    sink: SmtpSink, transport: SmtpTransport, caplog: pytest.LogCaptureFixture
) -> None:
    sink.refuse(EVE, 550, "5.1.1 No such user")
    raw = composed()
    with caplog.at_level(logging.WARNING, logger="gateway.mail.transport"):
        await transport.send(raw, HELP, [DANA, EVE])
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == (DANA,)
    [record] = caplog.records
    assert EVE in record.getMessage()
    assert "550 5.1.1 No such user" in record.getMessage()
    assert parse(raw)["Message-ID"] in record.getMessage()


async def test_connection_refused_is_temporary() -> None:
    transport = smtp(free_port())
    with pytest.raises(DeliveryError) as info:
        await transport.send(composed(), HELP, [DANA])
    assert info.value.permanent is False
    await transport.close()


async def test_silent_server_times_out_as_temporary() -> None:
    hold = asyncio.Event()

    async def never_greets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hold.wait()
        writer.close()

    server = await asyncio.start_server(never_greets, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = smtp(port, timeout=0.2)
    try:
        with pytest.raises(DeliveryError) as info:
            await transport.send(composed(), HELP, [DANA])
        assert info.value.permanent is False
    finally:
        hold.set()
        await transport.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("sender", "recipients"),
    [
        (HELP, []),
        (HELP, ["dana@users.test\r\nRCPT TO:<evil@attacker.test>"]),
        (HELP, ["dana users.test"]),
        ("help@helpdesk.test>\r\nRCPT TO:<x@y", [DANA]),
    ],
)
async def test_invalid_envelope_is_permanent(
    sink: SmtpSink, transport: SmtpTransport, sender: str, recipients: list[str]
) -> None:
    with pytest.raises(DeliveryError) as info:
        await transport.send(composed(), sender, recipients)
    assert info.value.permanent is True
    assert sink.connections == 0


async def test_idn_recipient_goes_out_as_punycode(sink: SmtpSink, transport: SmtpTransport) -> None:
    await transport.send(composed(), HELP, ["jorg@bücher.example"])
    [got] = await sink.wait_for(1)
    assert got.rcpt_tos == ("jorg@xn--bcher-kva.example",)


async def test_auth_login_and_password_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    password = "s3cret-Pa55word!"
    async with SmtpSink(credentials=("mailer", password)) as sink:
        transport = smtp(sink.port, username="mailer", password=password)
        assert password not in repr(transport)
        with caplog.at_level(logging.DEBUG):
            await transport.send(composed(), HELP, [DANA])
            await transport.send(composed(), HELP, [DANA])
            await transport.close()
        await sink.wait_for(2)
        assert sink.logins == ["mailer"]
        # Our side only: the sink's own server log (mail.log) is aiosmtpd's business.
        ours = "\n".join(r.getMessage() for r in caplog.records if r.name != "mail.log")
        assert password not in ours
        assert base64.b64encode(password.encode()).decode() not in ours


async def test_wrong_password_is_temporary(caplog: pytest.LogCaptureFixture) -> None:
    async with SmtpSink(credentials=("mailer", "right")) as sink:
        transport = smtp(sink.port, username="mailer", password="wrong-password")
        with caplog.at_level(logging.DEBUG), pytest.raises(DeliveryError) as info:
            await transport.send(composed(), HELP, [DANA])
        await transport.close()
    assert info.value.permanent is False
    assert info.value.code == 535
    assert "wrong-password" not in caplog.text
    assert "wrong-password" not in str(info.value)


async def test_required_starttls_never_falls_back_to_plain_text(sink: SmtpSink) -> None:
    transport = smtp(sink.port, starttls=True)
    with pytest.raises(DeliveryError) as info:
        await transport.send(composed(), HELP, [DANA])
    await transport.close()
    assert info.value.permanent is False
    assert sink.messages == []


async def test_close_is_idempotent_and_transport_reusable(
    sink: SmtpSink, transport: SmtpTransport
) -> None:
    await transport.send(composed(), HELP, [DANA])
    await transport.close()
    await transport.close()
    await transport.send(composed(), HELP, [DANA])
    await sink.wait_for(2)
    assert sink.connections == 2


async def test_sink_fail_next_counts_down(sink: SmtpSink, transport: SmtpTransport) -> None:
    sink.fail_next(2, 451)
    outcomes = []
    for _ in range(3):
        try:
            await transport.send(composed(), HELP, [DANA])
            outcomes.append("sent")
        except DeliveryError as exc:
            outcomes.append(f"temporary {exc.code}" if not exc.permanent else "permanent")
    assert outcomes == ["temporary 451", "temporary 451", "sent"]
    assert len(await sink.wait_for(1)) == 1


async def test_sink_wait_for_times_out_with_a_message(sink: SmtpSink) -> None:
    with pytest.raises(TimeoutError, match="expected 1 message"):
        await sink.wait_for(1, timeout=0.01)


# -- Maildir ----------------------------------------------------------------------------------


async def test_maildir_delivery(tmp_path: Path) -> None:
    box = tmp_path / "outbound"
    transport = MaildirTransport(box)
    raw = composed()
    await transport.send(raw, HELP, [DANA, EVE])
    assert sorted(p.name for p in box.iterdir()) == ["cur", "new", "tmp"]
    assert list((box / "tmp").iterdir()) == []
    [path] = list((box / "new").iterdir())
    assert ":" not in path.name and "/" not in path.name
    data = path.read_bytes()
    assert b"\r\n" not in data  # local mailboxes use LF
    msg = parse(data)
    assert msg["Return-Path"] == f"<{HELP}>"
    assert msg.get_all("X-Original-To") == [DANA, EVE]
    assert msg["Subject"] == "[Ticket#2026112700012] Grüße"
    assert msg["Message-ID"] == parse(raw)["Message-ID"]
    assert msg.get_content().startswith("Hello Dana,\n")
    await transport.close()


async def test_maildir_names_are_unique(tmp_path: Path) -> None:
    transport = MaildirTransport(tmp_path / "box")
    await asyncio.gather(*(transport.send(composed(f"m{i}"), HELP, [DANA]) for i in range(20)))
    files = list((tmp_path / "box" / "new").iterdir())
    assert len(files) == 20
    assert sorted(parse(f.read_bytes())["Subject"] for f in files) == sorted(
        f"m{i}" for i in range(20)
    )


async def test_maildir_refuses_bad_envelope(tmp_path: Path) -> None:
    transport = MaildirTransport(tmp_path / "box")
    with pytest.raises(DeliveryError) as info:
        await transport.send(composed(), "x\r\nBcc: y@z", [DANA])
    assert info.value.permanent is True
    assert not (tmp_path / "box").exists()


async def test_maildir_unwritable_is_temporary(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    transport = MaildirTransport(blocker / "box")
    with pytest.raises(DeliveryError) as info:
        await transport.send(composed(), HELP, [DANA])
    assert info.value.permanent is False


# -- choosing a transport ---------------------------------------------------------------------


async def test_make_transport(tmp_path: Path) -> None:
    maildir = make_transport(OutboundSettings(maildir=Path("var/out")), tmp_path)
    assert isinstance(maildir, MaildirTransport)
    assert maildir.directory == tmp_path / "var" / "out"
    absolute = make_transport(OutboundSettings(maildir=tmp_path / "abs"), Path("/elsewhere"))
    assert isinstance(absolute, MaildirTransport)
    assert absolute.directory == tmp_path / "abs"
    relay = make_transport(
        OutboundSettings(
            smarthost="smtp.example.org",
            port=587,
            starttls=True,
            username="u",
            password=SecretStr("p4ssw0rd-secret"),
        ),
        tmp_path,
    )
    assert isinstance(relay, SmtpTransport)
    assert (relay.host, relay.port) == ("smtp.example.org", 587)
    assert "p4ssw0rd-secret" not in repr(relay)
