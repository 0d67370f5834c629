"""An aiosmtpd "smarthost sink" for tests: a real SMTP server on loopback.

`SmtpSink` runs inside the test's own event loop (`loop.create_server` with the
aiosmtpd SMTP protocol, not the threaded Controller), so a test can await a send
and then look at what arrived without threads or sleeps::

    async with SmtpSink() as sink:
        await transport.send(raw, "help@helpdesk.test", ["dana@users.test"])
        [msg] = await sink.wait_for(1)
        assert msg.message["Subject"] == "..."

It records every accepted message (`messages`), counts connections, can answer
the next N transactions with a given code (`fail_next(2, 451)`) and refuse
chosen recipients (`refuse("x@y", 550)`), can require AUTH (`credentials=`), and
can drop its client connections to play a smarthost's idle timeout.
"""

from __future__ import annotations

import asyncio
import email.policy
import socket
import warnings
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from types import TracebackType
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = ["ReceivedMessage", "SmtpSink", "free_port"]

Stage = Literal["mail", "data"]

_DEFAULT_TEXT = {
    421: "4.3.2 Service shutting down",
    450: "4.2.0 Mailbox unavailable",
    451: "4.3.0 Try again later",
    452: "4.3.1 Insufficient system storage",
    550: "5.1.1 Mailbox unavailable",
    552: "5.3.4 Message too big",
    553: "5.1.3 Bad address",
    554: "5.7.1 Transaction failed",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for "connection refused" tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the sink accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    message: EmailMessage
    # The client's (host, port): equal for messages sent over the same connection.
    peer: tuple[str, int]


def _reply(code: int, text: str | None) -> str:
    return f"{code} {text or _DEFAULT_TEXT.get(code, 'Refused')}"


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        failure = self._sink._take_failure("mail")
        if failure is not None:
            return failure
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = self._sink._refused.get(address.lower())
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        failure = self._sink._take_failure("data")
        if failure is not None:
            return failure
        await self._sink._record(session, envelope)
        return f"250 2.0.0 Ok: queued as {len(self._sink.messages)}"


class SmtpSink:
    """A loopback SMTP server recording what it receives; an async context manager."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        hostname: str = "sink.test",
        credentials: tuple[str, str] | None = None,
        data_size_limit: int = 32 * 1024 * 1024,
    ) -> None:
        self.host = host
        self.hostname = hostname
        self.messages: list[ReceivedMessage] = []
        self.connections = 0
        # Usernames that authenticated successfully, in order.
        self.logins: list[str] = []
        self._credentials = credentials
        self._data_size_limit = data_size_limit
        self._failures: list[tuple[Stage, str]] = []
        self._refused: dict[str, str] = {}
        self._protocols: list[SMTP] = []
        self._server: asyncio.Server | None = None
        self._port = 0
        self._changed = asyncio.Condition()

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("SmtpSink is not running")
        return self._port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self.host, 0)
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self.drop_connections()
        await self._server.wait_closed()
        tasks = [t for p in self._protocols if (t := getattr(p, "_handler_coroutine", None))]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._server = None

    async def __aenter__(self) -> SmtpSink:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _protocol(self) -> SMTP:
        kwargs: dict[str, Any] = {}
        if self._credentials is not None:
            kwargs.update(
                authenticator=self._authenticate, auth_required=True, auth_require_tls=False
            )
        with warnings.catch_warnings():
            # AUTH without TLS is the point here: plain text on loopback.
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            proto = SMTP(
                _Handler(self),
                hostname=self.hostname,
                ident="helpdeskd test sink",
                data_size_limit=self._data_size_limit,
                loop=asyncio.get_running_loop(),
                **kwargs,
            )
        self._protocols.append(proto)
        self.connections += 1
        return proto

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self._credentials is not None
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            password = auth_data.password.decode("utf-8", "replace")
            if (user, password) == self._credentials:
                self.logins.append(user)
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    # -- behaviour ------------------------------------------------------------------------

    def fail_next(
        self, count: int = 1, code: int = 451, text: str | None = None, *, stage: Stage = "data"
    ) -> None:
        """Answer the next `count` transactions with `code` at MAIL or at the end of DATA."""
        self._failures.extend([(stage, _reply(code, text))] * count)

    def refuse(self, address: str, code: int = 550, text: str | None = None) -> None:
        """Answer every RCPT TO `address` with `code` (until the sink stops)."""
        self._refused[address.lower()] = _reply(code, text)

    def drop_connections(self) -> None:
        """Close every client connection from the server side (an idle timeout)."""
        for proto in self._protocols:
            transport = getattr(proto, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()

    def _take_failure(self, stage: Stage) -> str | None:
        if self._failures and self._failures[0][0] == stage:
            return self._failures.pop(0)[1]
        return None

    async def _record(self, session: Session, envelope: Envelope) -> None:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):  # only with decode_data=True, which we do not use
            raw = raw.encode("utf-8", "surrogateescape")
        parsed = BytesParser(policy=email.policy.default).parsebytes(raw)
        assert isinstance(parsed, EmailMessage)
        peer = session.peer if isinstance(session.peer, tuple) else ("", 0)
        received = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            raw=raw,
            message=parsed,
            peer=(str(peer[0]), int(peer[1])),
        )
        async with self._changed:
            self.messages.append(received)
            self._changed.notify_all()

    # -- waiting ----------------------------------------------------------------------

    # The helper owns its deadline so that callers just await it.
    async def wait_for(
        self,
        count: int,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> list[ReceivedMessage]:
        """Wait until at least `count` messages arrived; returns all received so far."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: len(self.messages) >= count)
        except TimeoutError:
            raise TimeoutError(
                f"SmtpSink: expected {count} message(s) within {timeout}s, got {len(self.messages)}"
            ) from None
        return list(self.messages)
