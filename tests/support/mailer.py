"""Test helpers: build messages and send them to the daemon over real SMTP."""

from __future__ import annotations

import email.utils
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import Any

import aiosmtplib


def make_mail(
    subject: str = "Cannot log in",
    body: str = "Hello, I cannot log in to the portal.\n",
    *,
    sender: str = "Dana User <dana@users.test>",
    to: str = "help@helpdesk.test",
    cc: str | None = None,
    message_id: str | None = "auto",
    date: bool = True,
    headers: dict[str, str] | None = None,
    in_reply_to: str | None = None,
    references: str | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    if date:
        msg["Date"] = email.utils.formatdate(localtime=False)
    if message_id == "auto":
        msg["Message-ID"] = email.utils.make_msgid(domain="users.test")
    elif message_id:
        msg["Message-ID"] = message_id
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = references
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content(body)
    return msg.as_bytes(policy=SMTP_POLICY)


async def send(
    port: int,
    raw: bytes,
    *,
    mail_from: str = "dana@users.test",
    rcpt_to: tuple[str, ...] = ("help@helpdesk.test",),
) -> tuple[int, str]:
    """Send one message; returns the (code, text) the server answered to DATA."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
    await client.connect()
    try:
        await client.ehlo()
        await client.mail(mail_from)
        for r in rcpt_to:
            await client.rcpt(r)
        response = await client.data(raw)
        return response.code, response.message
    finally:
        await client.quit()


async def send_raw_session(port: int, commands: list[tuple[str, Any]]) -> list[Any]:
    """Run a scripted SMTP session; returns each step's response or exception."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
    await client.connect()
    out: list[Any] = []
    try:
        await client.ehlo()
        for name, arg in commands:
            try:
                out.append(await getattr(client, name)(arg))
            except aiosmtplib.SMTPResponseException as exc:
                out.append(exc)
    finally:
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            client.close()
    return out
