"""Delivery of already-composed mail: SMTP to a smarthost, or a local Maildir.

A transport takes the bytes `compose()` produced plus an envelope and either
hands them on or raises `DeliveryError`, whose `permanent` flag tells the outbox
whether retrying can help. `make_transport()` picks the transport from the
`[outbound]` settings: `SmtpTransport` when a smarthost is configured, otherwise
`MaildirTransport`, which keeps every message on disk for inspection.

Classification (RFC 5321 §4.2.1): a 5xx answer to MAIL, RCPT or DATA is
permanent; 4xx answers, network errors and timeouts are temporary. Failures that
concern the connection rather than the message -- greeting, EHLO, STARTTLS,
AUTH -- are temporary whatever their code: a wrong password or a smarthost that
refuses us must not mark every queued message as failed for good; the outbox
retries until the operator fixes it.

Partial refusals: when the smarthost accepts the message for some recipients and
refuses others, the message has been sent; `send()` returns normally and logs a
warning naming the refused recipients and their replies. Only when *every*
recipient is refused does it raise (permanent if all refusals were 5xx).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import re
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import aiosmtplib

from gateway.config import OutboundSettings
from gateway.mail.compose import ComposeError, encode_address, random_hex

__all__ = [
    "DeliveryError",
    "MaildirTransport",
    "SmtpTransport",
    "Transport",
    "make_transport",
]

log = logging.getLogger(__name__)

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]{1,250}>)", re.IGNORECASE | re.MULTILINE)


class DeliveryError(Exception):
    """A message was not delivered. `permanent`: retrying cannot help (5xx, bad address)."""

    def __init__(self, message: str, *, permanent: bool, code: int | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        # The SMTP reply code, when the failure was a reply.
        self.code = code


class Transport(Protocol):
    """Where composed mail goes."""

    async def send(self, raw: bytes, envelope_from: str, recipients: Sequence[str]) -> None:
        """Deliver `raw` (RFC 5322 bytes, CRLF) or raise DeliveryError."""
        ...

    async def close(self) -> None:
        """Release connections; the transport may still be used afterwards."""
        ...


def _message_id(raw: bytes) -> str:
    """The Message-ID of `raw`, for log lines."""
    end = raw.find(b"\r\n\r\n")
    match = _MESSAGE_ID.search(raw, 0, end if end >= 0 else len(raw))
    return match.group(1).decode("ascii", "replace") if match else "<no Message-ID>"


def _envelope(envelope_from: str, recipients: Sequence[str]) -> tuple[str, list[str]]:
    """ASCII envelope addresses (IDNA domains), or a permanent DeliveryError."""
    if not recipients:
        raise DeliveryError("no recipients", permanent=True)
    try:
        # "" is the null reverse-path (RFC 5321 §4.5.5); everything else must be a mailbox.
        sender = encode_address(envelope_from) if envelope_from else ""
        return sender, [encode_address(r) for r in recipients]
    except ComposeError as exc:
        raise DeliveryError(f"invalid envelope: {exc}", permanent=True) from None


def _is_permanent(code: int) -> bool:
    return 500 <= code <= 599


class SmtpTransport:
    """Sends through one smarthost over a connection kept open between messages.

    Sends are serialised on that connection. If the smarthost has closed an idle
    connection, the message is tried once more on a fresh one; any other failure
    discards the connection so the next send starts clean. STARTTLS, when
    configured, is required: there is no silent fallback to plain text.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        starttls: bool,
        username: str,
        password: str,
        timeout: float,
        local_hostname: str | None = None,
    ) -> None:
        if not host:
            raise ValueError("SmtpTransport needs a smarthost")
        if password and not username:
            raise ValueError("a smarthost password needs a username")
        self._host = host
        self._port = port
        self._starttls = starttls
        self._username = username
        self._password = password
        self._timeout = timeout
        self._local_hostname = local_hostname
        self._client: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        # Never the password.
        user = f", username={self._username!r}" if self._username else ""
        return f"SmtpTransport({self._host}:{self._port}, starttls={self._starttls}{user})"

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    async def send(self, raw: bytes, envelope_from: str, recipients: Sequence[str]) -> None:
        sender, rcpts = _envelope(envelope_from, recipients)
        mid = _message_id(raw)
        async with self._lock:
            try:
                refused = await self._transaction(raw, sender, rcpts, mid)
            except asyncio.CancelledError:
                self._discard()  # the conversation stopped at an unknown point
                raise
            except Exception as exc:
                error = self._classify(exc)
                # Info, not warning: the caller decides (retry or give up) and logs that.
                log.info(
                    "message %s: delivery via %s:%s failed (%s): %s",
                    mid,
                    self._host,
                    self._port,
                    "permanent" if error.permanent else "temporary",
                    error,
                )
                raise error from exc
        if refused:
            log.warning(
                "message %s: sent, but %s:%s refused %d of %d recipients: %s",
                mid,
                self._host,
                self._port,
                len(refused),
                len(rcpts),
                "; ".join(f"{rcpt}: {r.code} {r.message}" for rcpt, r in refused.items()),
            )
        else:
            log.debug("message %s: sent via %s:%s", mid, self._host, self._port)

    async def _transaction(
        self, raw: bytes, sender: str, rcpts: list[str], mid: str
    ) -> dict[str, aiosmtplib.SMTPResponse]:
        client, reused = await self._connection()
        try:
            errors, _ = await client.sendmail(sender, rcpts, raw)
            return errors
        except aiosmtplib.SMTPServerDisconnected:
            self._discard()
            if not reused:
                raise
        # A connection we reused was gone: almost always the smarthost's idle
        # timeout, so try once on a fresh one. (Had it vanished after the final
        # "." but before the reply, this duplicates the message: the window
        # RFC 1047 describes, which every SMTP retry has, the outbox's included.)
        log.info(
            "message %s: %s:%s dropped the idle connection; reconnecting",
            mid,
            self._host,
            self._port,
        )
        client, _ = await self._connection()
        errors, _ = await client.sendmail(sender, rcpts, raw)
        return errors

    async def _connection(self) -> tuple[aiosmtplib.SMTP, bool]:
        """The open connection (reused=True) or a new, authenticated one."""
        if self._client is not None and self._client.is_connected:
            return self._client, True
        self._discard()
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            timeout=self._timeout,
            start_tls=self._starttls,
            local_hostname=self._local_hostname,
        )
        try:
            await client.connect()
            if self._username:
                await client.login(self._username, self._password)
        except BaseException:
            client.close()
            raise
        self._client = client
        return client, False

    def _discard(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _classify(self, exc: Exception) -> DeliveryError:
        """Turn an aiosmtplib or network error into a DeliveryError (and drop the
        connection unless the server answered in an orderly way and stays usable)."""
        if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            if 421 in codes:
                self._discard()
            return DeliveryError(
                f"all recipients refused: {detail}",
                permanent=all(_is_permanent(c) for c in codes),
                code=codes[0] if codes else None,
            )
        if isinstance(exc, aiosmtplib.SMTPSenderRefused | aiosmtplib.SMTPDataError):
            # Answers about this message; the client has sent RSET, so the
            # connection can be reused -- unless the server is closing it (421).
            if exc.code == 421:
                self._discard()
            stage = "sender" if isinstance(exc, aiosmtplib.SMTPSenderRefused) else "message"
            return DeliveryError(
                f"{stage} refused: {exc.code} {exc.message}",
                permanent=_is_permanent(exc.code),
                code=exc.code,
            )
        self._discard()
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            # Greeting, EHLO, STARTTLS or AUTH: a problem with the smarthost or our
            # configuration, not with this message.
            return DeliveryError(
                f"smarthost refused the session: {exc.code} {exc.message}",
                permanent=False,
                code=exc.code,
            )
        if isinstance(exc, ValueError):
            # aiosmtplib refuses an address it cannot put on a command line.
            return DeliveryError(f"invalid envelope: {exc}", permanent=True)
        if isinstance(exc, aiosmtplib.SMTPException | OSError | TimeoutError):
            return DeliveryError(f"{type(exc).__name__}: {exc}", permanent=False)
        return DeliveryError(f"unexpected {type(exc).__name__}: {exc}", permanent=False)

    async def close(self) -> None:
        async with self._lock:
            client, self._client = self._client, None
            if client is None:
                return
            if client.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                    await client.quit()
            client.close()


class MaildirTransport:
    """Writes each message into a Maildir (used when no smarthost is configured).

    Delivery follows the Maildir convention (cr.yp.to/proto/maildir.html): write
    to tmp/ under a unique name, fsync, link into new/, unlink, fsync new/.
    Lines end in LF as in any local mailbox, and Return-Path plus one
    X-Original-To per recipient are prepended so the envelope stays visible.
    File I/O runs in a worker thread.
    """

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._counter = itertools.count(1)
        self._host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")

    def __repr__(self) -> str:
        return f"MaildirTransport({str(self._dir)!r})"

    @property
    def directory(self) -> Path:
        return self._dir

    def _unique_name(self) -> str:
        # Maildir spec: "time.MusecPpidQn.host"; the random part guards against
        # two daemons with the same pid (containers) sharing the directory.
        now = time.time()
        sec, usec = int(now), int((now % 1) * 1_000_000)
        return (
            f"{sec}.M{usec}P{os.getpid()}Q{next(self._counter)}R{random_hex(4)}.{self._host}"
        )

    async def send(self, raw: bytes, envelope_from: str, recipients: Sequence[str]) -> None:
        sender, rcpts = _envelope(envelope_from, recipients)
        trace = [f"Return-Path: <{sender}>", *(f"X-Original-To: {r}" for r in rcpts)]
        data = ("\n".join(trace) + "\n").encode("ascii") + raw.replace(b"\r\n", b"\n")
        name = self._unique_name()
        try:
            path = await asyncio.to_thread(self._deliver, name, data)
        except OSError as exc:
            raise DeliveryError(f"maildir {self._dir}: {exc}", permanent=False) from exc
        log.debug("message %s: stored as %s", _message_id(raw), path)

    def _deliver(self, name: str, data: bytes) -> Path:
        for sub in ("tmp", "new", "cur"):
            (self._dir / sub).mkdir(parents=True, exist_ok=True)
        tmp = self._dir / "tmp" / name
        new = self._dir / "new" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, new)  # never overwrites an existing message
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                os.rename(tmp, new)  # file systems without hard links
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(self._dir / "new", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return new

    async def close(self) -> None:
        return None


def make_transport(settings: OutboundSettings, base_dir: Path) -> Transport:
    """SmtpTransport to `[outbound] smarthost` if set, else a Maildir at `maildir`
    (relative paths resolved against `base_dir`, the config file's directory)."""
    if settings.smarthost:
        return SmtpTransport(
            settings.smarthost,
            settings.port,
            starttls=settings.starttls,
            username=settings.username,
            password=settings.password.get_secret_value(),
            timeout=settings.timeout_seconds,
        )
    directory = settings.maildir if settings.maildir.is_absolute() else base_dir / settings.maildir
    return MaildirTransport(directory)
