"""The inbound SMTP channel: aiosmtpd inside the daemon's own event loop.

RCPT accepts only configured inbound addresses and their `+` sub-addresses
(550 5.1.1 otherwise, so the daemon is no open relay: B24); the SIZE limit is
advertised in EHLO and enforced with 552 (B21); DATA is answered 250 only after
the message is committed, and 451 4.3.0 when the store failed, so the sending
MTA keeps the message and retries (RFC 5321 section 4.2.5). Under a burst the
commit is of the raw message to the spool and the reply says "queued"; its
ticket follows (`App.accept`; docs/design.md, "Accept first under a burst").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.channels import Submit
from gateway.config import Settings
from gateway.intake import StoreUnavailable
from gateway.message import Channel, Inbound

log = logging.getLogger(__name__)


class _Handler:
    def __init__(self, channel: SmtpChannel) -> None:
        self.channel = channel

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.channel.settings.inbound_for(address) is None:
            log.info("smtp: refused RCPT %s from %s", address, session.peer)
            return "550 5.1.1 Recipient address rejected: not served here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        return await self.channel.deliver(envelope)


class SmtpChannel:
    """Listens on [smtp] host:port and submits each message to the intake."""

    def __init__(self, settings: Settings, submit: Submit) -> None:
        self.settings = settings
        self.submit = submit
        self.name = "smtp"
        self._server: asyncio.Server | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tls: ssl.SSLContext | None = None
        s = settings.smtp
        if s.tls_cert is not None and s.tls_key is not None:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(settings.path(s.tls_cert), settings.path(s.tls_key))

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def _protocol(self) -> SMTP:
        s = self.settings.smtp
        return SMTP(
            _Handler(self),
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,
            hostname=s.hostname,
            ident="helpdeskd",
            tls_context=self._tls,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        s = self.settings.smtp
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host=s.host, port=s.port)
        log.info("smtp: listening on %s:%d (max %d bytes%s)", s.host, self.port,
                 s.max_message_size, ", STARTTLS" if self._tls else "")

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()  # no new connections
        await self._idle.wait()  # messages already in DATA get their answer
        self._server = None
        log.info("smtp: stopped")

    async def deliver(self, envelope: Envelope) -> str:
        inbound = Inbound(
            channel=Channel.EMAIL,
            raw=envelope.original_content or b"",
            received_at=dt.datetime.now(dt.UTC),
            source="smtp",
            mail_from=_mail_from(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
        )
        self._in_flight += 1
        self._idle.clear()
        try:
            result = await self.submit(inbound)
        except StoreUnavailable as exc:
            log.error("smtp: message from %s not stored, answered 451: %s",
                      inbound.mail_from, exc)
            return "451 4.3.0 Temporary storage failure, please retry"
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        ticket = f" {result.ticket}" if result.ticket else ""
        return f"250 2.0.0 OK {result.outcome.value}{ticket}"


def _mail_from(value: Any) -> str:
    # aiosmtpd gives "<>" as "" already for the null reverse-path; keep it "" (B17).
    text = str(value or "").strip()
    return "" if text in ("", "<>") else text.lower()
