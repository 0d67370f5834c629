"""The IMAP channel: drains one configured mailbox into the intake, each message once.

One `ImapChannel` per `[[imap]]` entry, each running its own task, so one failing
mailbox never stops another or the daemon. A session connects (implicit TLS,
STARTTLS or, if explicitly allowed, plain text), logs in, selects the folder and
then alternates between draining and waiting: IDLE (RFC 2177) when the server
offers it, re-issued before 29 minutes; NOOP polling (RFC 3501 section 6.1.2) at
`poll_interval_seconds` otherwise.

Exactly once, tracked by UIDVALIDITY + UID (RFC 3501 section 2.3.1.1), never by
\\Seen (a person reading the mailbox must not hide mail from the daemon):

1. `UID SEARCH UID <last+1>:*` lists what is new; `UID FETCH ... BODY.PEEK[]`
   (PEEK: fetching sets no flag; never ENVELOPE) takes it in batches bounded by
   `batch_size` and `batch_bytes`, sized first with RFC822.SIZE.
2. Each message goes through `submit` like SMTP mail; the batch's submits run
   together so the intake commits them in one transaction.
3. After the commit: the position (`last_uid`) is stored, then the messages are
   moved to `done_folder` (or flagged \\Seen) and the ones the pipeline
   quarantined moved to `quarantine_folder`, then `acked_uid` is stored. A crash
   between the steps is repaired at the next connect from those two numbers; a
   crash between the intake's commit and storing `last_uid` re-fetches the
   message, and the Message-ID dedup (without one: the SHA-256 of its bytes in
   this mailbox) makes that a no-op; a held quarantine row makes a quarantined
   message one too.

Every IMAP call runs under `asyncio.timeout` and races the connection's loss
(aioimaplib never completes a command whose connection dropped). Any error, BYE
or lost connection discards the client; the next session starts from a fresh
connection after a capped exponential backoff with jitter. Health (connected,
mode, last success, last error) is logged and stored in `imap_state`, where
`helpdeskd status` reads it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import email.policy
import hashlib
import logging
import random
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Any, TypeVar

import aioimaplib
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from gateway.channels import Submit
from gateway.config import ImapSettings, Settings
from gateway.intake import StoreUnavailable
from gateway.message import Channel, Inbound
from gateway.pipeline import Disposition, Outcome
from gateway.store.models import ImapState, QuarantineRow

log = logging.getLogger(__name__)

T = TypeVar("T")

_FETCH_LINE = re.compile(rb"^\d+ FETCH \(")
_UID = re.compile(rb"\bUID (\d+)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_EXISTS = re.compile(rb"^\* \d+ EXISTS")


class ImapError(Exception):
    """The server refused a command, said BYE, went silent or dropped the connection."""


# Sessions in which fetching one message alone may fail before it is quarantined. A
# server that cannot deliver a message (Dovecot: "BYE FETCH failed: Internal error")
# fails the same way every time; a few attempts tell that from a connection that
# merely dropped at the wrong moment.
FETCH_ATTEMPTS = 3


# -- protocol helpers (pure) ------------------------------------------------------------


def mailbox_name(name: str) -> str:
    """A mailbox name as an IMAP quoted string, in modified UTF-7 (RFC 3501 section 5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            utf16 = "".join(pending).encode("utf-16-be")
            b64 = base64.b64encode(utf16).decode("ascii").rstrip("=").replace("/", ",")
            out.append(f"&{b64}-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    encoded = "".join(out).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{encoded}"'


def uid_set(uids: Iterable[int]) -> str:
    """A compact UID set ("3:7,9,12:13") for sorted or unsorted UIDs."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("empty UID set")
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if prev != start else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(parts)


def _ranges(uids: str) -> list[tuple[int, int]]:
    """The (low, high) ranges of a UID set without `*` ("3:5,7" -> [(3, 5), (7, 7)])."""
    found: list[tuple[int, int]] = []
    for piece in uids.split(","):
        low, _, high = piece.partition(":")
        a, b = int(low), int(high or low)
        found.append((min(a, b), max(a, b)))
    return found


def uid_set_without(uids: str, taken: Iterable[str]) -> str | None:
    """`uids` minus every UID in the sets `taken`, as a UID set; None if nothing is left.

    Works on ranges, never on single UIDs: a range such as "4:900000" names far
    more UIDs than exist.
    """
    left = _ranges(uids)
    for cut_low, cut_high in (r for t in taken for r in _ranges(t)):
        kept: list[tuple[int, int]] = []
        for low, high in left:
            if cut_high < low or high < cut_low:
                kept.append((low, high))
                continue
            if low < cut_low:
                kept.append((low, cut_low - 1))
            if cut_high < high:
                kept.append((cut_high + 1, high))
        left = kept
    if not left:
        return None
    return ",".join(f"{a}:{b}" if a != b else str(a) for a, b in sorted(left))


def _text(lines: Sequence[Any]) -> str:
    last = lines[-1] if lines else b""
    return bytes(last).decode("utf-8", "replace") if isinstance(last, bytes | bytearray) else ""


def check(response: Any, what: str) -> Any:
    """`response` if the command completed OK, else ImapError naming the command."""
    if response.result != "OK":
        raise ImapError(f"{what}: {response.result} {_text(response.lines)}".strip())
    return response


def parse_uidvalidity(lines: Sequence[Any]) -> int:
    for line in lines:
        if isinstance(line, bytes):
            m = _UIDVALIDITY.search(line)
            if m:
                return int(m.group(1))
    # RFC 3501 section 6.3.1 requires the UIDVALIDITY response code in SELECT's answer.
    raise ImapError("SELECT: the server sent no UIDVALIDITY")


def parse_search(lines: Sequence[Any]) -> list[int]:
    """UIDs of a SEARCH answer (aioimaplib strips the `* SEARCH` prefix; the last line
    is the tagged status text)."""
    uids: list[int] = []
    for line in lines[:-1]:
        if isinstance(line, bytes):
            words = line.split()
            if words and words[0].upper() == b"SEARCH":
                words = words[1:]
            if all(w.isdigit() for w in words):
                uids.extend(int(w) for w in words)
    return uids


@dataclass(slots=True)
class Fetched:
    """One message of a FETCH answer: its size and/or its bytes, as asked for."""

    uid: int
    size: int | None = None
    body: bytes | None = None


def parse_fetch(lines: Sequence[Any]) -> dict[int, Fetched]:
    """FETCH answers by UID. aioimaplib hands a literal as a separate bytearray item
    after the line announcing it, and the rest of that FETCH (e.g. ")") after it.
    Unsolicited FETCH responses (flag changes by other clients) carry no body and
    are kept only for what they say."""
    found: dict[int, Fetched] = {}
    i, end = 0, len(lines) - 1  # the last line is the tagged status text
    while i < end:
        line = lines[i]
        i += 1
        if not isinstance(line, bytes) or not _FETCH_LINE.match(line):
            continue
        text = line
        body: bytes | None = None
        if line.endswith(b"}") and i < end and isinstance(lines[i], bytearray):
            body = bytes(lines[i])
            i += 1
            if i < end and isinstance(lines[i], bytes) and not _FETCH_LINE.match(lines[i]):
                text += lines[i]
                i += 1
        uid_match = _UID.search(text)
        if uid_match is None:
            continue
        item = found.setdefault(int(uid_match.group(1)), Fetched(int(uid_match.group(1))))
        size_match = _SIZE.search(text)
        if size_match is not None:
            item.size = int(size_match.group(1))
        if body is not None:
            item.body = body
    return found


def plan_batches(
    uids: Sequence[int], sizes: dict[int, int], *, batch_size: int, batch_bytes: int,
    max_message_size: int,
) -> list[list[int]]:
    """Split `uids` (in order) into batches of at most batch_size messages and
    batch_bytes octets of bodies to fetch (one larger message goes alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        cost = size if size <= max_message_size else 0  # never fetched
        if current and (len(current) >= batch_size or current_bytes + cost > batch_bytes):
            batches.append(current)
            current, current_bytes = [], 0
        current.append(uid)
        current_bytes += cost
    if current:
        batches.append(current)
    return batches


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Capped exponential backoff with jitter: a random point in the upper half."""
    delay = min(cap, base * (2 ** min(attempt, 30)))
    return float(delay * (0.5 + rand() / 2))


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- state and health -------------------------------------------------------------------


@dataclass(slots=True)
class Position:
    """Where ingest stands in the mailbox (see ImapState)."""

    uidvalidity: int | None = None
    last_uid: int = 0
    acked_uid: int = 0
    pending_quarantine: list[int] = field(default_factory=list)
    # UID -> (sessions whose FETCH of it failed, the last error); see ImapState.
    fetch_failures: dict[int, tuple[int, str]] = field(default_factory=dict)
    # UID sets above acked_uid already copied (servers without MOVE); see ImapState.
    copied: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Health:
    """What `helpdeskd status` shows for one mailbox."""

    connected: bool = False
    mode: str = ""
    ingested: int = 0
    failures: int = 0
    last_success_at: dt.datetime | None = None
    last_error: str | None = None
    last_error_at: dt.datetime | None = None


@dataclass(slots=True)
class Stats:
    """Counters for tests and the bench (not persisted)."""

    connects: int = 0
    batches: int = 0
    max_batch_messages: int = 0
    max_batch_bytes: int = 0
    largest_message: int = 0
    idle_wakeups: int = 0


@dataclass(slots=True)
class _Submitted:
    """A batch handed to the intake: its UIDs, their sizes, one future per fetched body."""

    batch: list[int]
    sizes: dict[int, int]
    futures: dict[int, asyncio.Future[Disposition]]
    # UIDs given up on after FETCH_ATTEMPTS failed fetches, with why.
    unfetchable: dict[int, str] = field(default_factory=dict)
    # UIDs fetched again whose message already has a held quarantine row.
    held: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Ack:
    """A settled batch: committed through `through`; what to move where; what failed."""

    through: int
    done: list[int]
    quarantined: list[int]
    failure: BaseException | None


def _consume(future: asyncio.Future[Disposition]) -> None:
    """Retrieve an abandoned submission's outcome (asyncio warns about unread errors)."""
    if not future.cancelled():
        future.exception()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class StateStore:
    """Reads and writes one mailbox's `imap_state` row (blocking; call off the loop)."""

    def __init__(self, sessions: sessionmaker[Session], name: str, source: str) -> None:
        self.sessions = sessions
        self.name = name
        self.source = source

    def _row(self, session: Session) -> ImapState:
        row = session.get(ImapState, self.name)
        if row is None:
            row = ImapState(name=self.name, source=self.source, last_uid=0, acked_uid=0,
                            pending_quarantine=[], fetch_failures={}, copied_uids=[],
                            connected=False,
                            mode="", ingested=0, failures=0)
            session.add(row)
        return row

    def load(self) -> Position:
        with self.sessions() as session:
            row = session.get(ImapState, self.name)
            if row is None or row.source != self.source:
                # Another server, user or folder under this name: its UIDs mean nothing here.
                return Position()
            failures = {int(uid): (int(n), str(error))
                        for uid, (n, error) in (row.fetch_failures or {}).items()}
            return Position(row.uidvalidity, row.last_uid, row.acked_uid,
                            list(row.pending_quarantine or []), failures,
                            list(row.copied_uids or []))

    def held(self, channel_message_ids: Iterable[str]) -> set[str]:
        """Which of these messages already have a held quarantine row.

        The pipeline records no dedup key for what it quarantines (the savepoint that
        failed is rolled back), so a message fetched again -- after a crash before
        the position was stored, or a failed move -- would be quarantined once more.
        A row `helpdeskd quarantine retry` took back (state "retried") does not count.
        """
        ids = list(channel_message_ids)
        if not ids:
            return set()
        with self.sessions() as session:
            return set(session.scalars(select(QuarantineRow.channel_message_id).where(
                QuarantineRow.state == "held",
                QuarantineRow.channel_message_id.in_(ids))))

    def record_oversized(self, uid: int, channel_message_id: str, size: int, limit: int,
                         folder: str) -> None:
        """A quarantine row for a message too large to fetch (B20: a readable reason)."""
        self._record_unfetched(channel_message_id, "too-large",
                               f"UID {uid} is {size} bytes, over max_message_size {limit}; "
                               f"not fetched, moved to the IMAP folder {folder!r}")

    def record_unfetchable(self, uid: int, channel_message_id: str, attempts: int,
                           error: str, folder: str) -> None:
        """A quarantine row for a message the server failed to deliver (B20)."""
        self._record_unfetched(channel_message_id, "unfetchable",
                               f"UID {uid}: the server failed to deliver it in {attempts} "
                               f"sessions (last: {error}); not ingested, moved to the IMAP "
                               f"folder {folder!r}")

    def _record_unfetched(self, channel_message_id: str, reason: str, detail: str) -> None:
        """A quarantine row for a message left on the server, in the quarantine folder,
        where a person can look at it (or move it back to be fetched again under a new
        UID): the row carries no bytes, only where to find it. Not recorded twice."""
        if self.held([channel_message_id]):
            return
        with self.sessions() as session, session.begin():
            session.add(QuarantineRow(
                received_at=_now(), channel=Channel.EMAIL.value, source=f"imap:{self.name}",
                stage="fetch", reason=reason, detail=detail,
                channel_message_id=channel_message_id, raw=b"", rcpt_tos=[], state="held",
            ))

    def save(self, position: Position | None = None, health: Health | None = None) -> None:
        with self.sessions() as session, session.begin():
            row = self._row(session)
            if position is not None:
                row.source = self.source
                row.uidvalidity = position.uidvalidity
                row.last_uid = position.last_uid
                row.acked_uid = position.acked_uid
                row.pending_quarantine = list(position.pending_quarantine)
                # JSON object keys are strings.
                row.fetch_failures = {str(uid): [n, error] for uid, (n, error)
                                      in sorted(position.fetch_failures.items())}
                row.copied_uids = list(position.copied)
            if health is not None:
                row.connected = health.connected
                row.mode = health.mode
                row.ingested = health.ingested
                row.failures = health.failures
                row.last_success_at = health.last_success_at
                row.last_error = health.last_error
                row.last_error_at = health.last_error_at
            row.updated_at = _now()

    def load_health(self) -> Health:
        with self.sessions() as session:
            row = session.get(ImapState, self.name)
            if row is None:
                return Health()
            return Health(ingested=row.ingested, last_success_at=row.last_success_at,
                          last_error=row.last_error, last_error_at=row.last_error_at)


# -- one connection ---------------------------------------------------------------------


class Connection:
    """One aioimaplib client. Used until its first error, then discarded, never reused."""

    def __init__(self, mailbox: ImapSettings, ssl_context: ssl.SSLContext | None) -> None:
        self.mailbox = mailbox
        self.timeout = mailbox.timeout_seconds
        self.lost = asyncio.Event()
        # IMAP4_SSL takes no conn_lost_cb (aioimaplib issue 107); IMAP4 with an SSL
        # context is the same implicit-TLS connection, with the callback.
        self.client: Any = aioimaplib.IMAP4(
            host=mailbox.host, port=mailbox.effective_port, timeout=self.timeout,
            conn_lost_cb=self._on_lost,
            ssl_context=ssl_context if mailbox.tls == "implicit" else None,
        )

        # RFC 3501 section 7.3.1 lets a server announce new mail (EXISTS) in the
        # answer to any command, and Dovecot does so, e.g. right after an empty
        # SEARCH result. aioimaplib drops such a line when no NOOP is pending; IDLE
        # would then wait for the next message. So every EXISTS is noted here.
        self.exists_seen = False
        # The text of a BYE (RFC 3501 section 7.1.5): the server's reason for closing,
        # e.g. Dovecot's "FETCH failed: Internal error", shown with the lost connection.
        self.bye: str | None = None
        protocol = self.client.protocol
        untagged = protocol._untagged_response

        def note_exists(line: bytes) -> Any:
            if _EXISTS.match(line):
                self.exists_seen = True
            elif line.startswith(b"* BYE"):
                self.bye = bytes(line[2:]).decode("utf-8", "replace")
            return untagged(line)

        protocol._untagged_response = note_exists

    def _on_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    def take_exists(self) -> bool:
        """Whether the server announced new mail since the last call."""
        seen, self.exists_seen = self.exists_seen, False
        return seen

    @property
    def capabilities(self) -> set[str]:
        caps: set[str] = self.client.protocol.capabilities
        return {c.upper() for c in caps}

    async def call(self, awaitable: Awaitable[T], what: str, within: float | None = None) -> T:
        """Await one IMAP call with a timeout, failing at once if the connection drops."""
        task = asyncio.ensure_future(awaitable)
        lost = asyncio.ensure_future(self.lost.wait())
        limit = self.timeout if within is None else within
        timed_out = False
        try:
            async with asyncio.timeout(limit):
                await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            timed_out = True
        finally:
            lost.cancel()
            finished = task.done()
            if not finished:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if not finished:
            if timed_out:
                raise ImapError(f"{what}: no answer within {limit:g}s")
            said = f" (server said {self.bye})" if self.bye else ""
            raise ImapError(f"{what}: connection lost{said}")
        try:
            return task.result()
        except (aioimaplib.AioImapException, OSError, ValueError) as exc:
            raise ImapError(f"{what}: {type(exc).__name__}: {exc}") from exc
        except TimeoutError:
            raise ImapError(f"{what}: no answer within {limit:g}s") from None

    async def wait_push(self, seconds: float, stop: asyncio.Event) -> list[bytes] | None:
        """The next lines the server pushes during IDLE; None on timeout or stop."""
        get = asyncio.ensure_future(self.client.protocol.idle_queue.get())
        stopped = asyncio.ensure_future(stop.wait())
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            done, _ = await asyncio.wait({get, stopped, lost}, timeout=seconds,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (get, stopped, lost):
                if not t.done():
                    t.cancel()
        if get in done:
            lines: list[bytes] = get.result()
            return lines
        if lost in done:
            raise ImapError("IDLE: connection lost")
        return None

    def discard(self) -> None:
        """Drop the connection and everything aioimaplib still has running for it."""
        client = self.client
        with contextlib.suppress(Exception):
            if client._idle_waiter is not None:
                client._idle_waiter.cancel()
        for task in [client._client_task, *client.tasks, *client.protocol.tasks]:
            if not task.done():
                task.cancel()
        transport = client.protocol.transport
        if transport is not None:
            transport.close()


# -- the channel ------------------------------------------------------------------------


class ImapChannel:
    """Drains one [[imap]] mailbox; `start` returns at once, the work runs in a task."""

    def __init__(
        self,
        settings: Settings,
        mailbox: ImapSettings,
        submit: Submit,
        sessions: sessionmaker[Session],
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.mailbox = mailbox
        self.submit = submit
        self.name = f"imap:{mailbox.name}"
        self.source = f"{mailbox.user}@{mailbox.host}:{mailbox.effective_port}/{mailbox.folder}"
        self.store = StateStore(sessions, mailbox.name, self.source)
        self.health = Health()
        self.stats = Stats()
        # The position of the current session (as stored), for tests and the bench.
        self.position = Position()
        self._rand = rand
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ssl: ssl.SSLContext | None = None
        # True while a batch is between fetch and acknowledgement: stop() waits for it.
        self._busy = False
        self._drained = False

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping.clear()
        self.health = await asyncio.to_thread(self.store.load_health)
        self._task = asyncio.create_task(self._run(), name=f"channel:{self.name}")
        log.info("%s: started for %s (%s, after ingest: %s)", self.name,
                 self.mailbox.address, self.source, self.mailbox.after)

    async def stop(self) -> None:
        """Stop; a batch in hand is first committed and acknowledged (bounded by timeouts).

        Outside a batch the task only waits (IDLE, poll, backoff, connect), and
        cancelling it there loses nothing: the connection is simply dropped."""
        task = self._task
        if task is None:
            return
        self._stopping.set()
        if not self._busy:
            task.cancel()
        grace = 3 * self.mailbox.timeout_seconds
        await asyncio.wait({task}, timeout=grace)
        if not task.done():
            log.warning("%s: batch not finished within %gs, cancelled", self.name, grace)
            task.cancel()
            await asyncio.wait({task})
        self._task = None
        self.health.connected = False
        self.health.mode = ""
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.store.save, None, self.health)
        log.info("%s: stopped", self.name)

    # -- supervision --------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            conn: Connection | None = None
            self._drained = False
            try:
                conn = await self._connect()
                await self._session(conn)
                with contextlib.suppress(ImapError):
                    await conn.call(conn.client.logout(), "LOGOUT", within=2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: discard, back off, reconnect
                await self._failed(exc)
            finally:
                if conn is not None:
                    conn.discard()
            if self._stopping.is_set():
                break
            if self._drained:  # the connection worked: start the backoff afresh
                attempt = 0
            delay = backoff_delay(attempt, self.mailbox.backoff_seconds,
                                  self.mailbox.backoff_max_seconds, self._rand)
            attempt += 1
            log.info("%s: reconnecting in %.1fs (attempt %d)", self.name, delay, attempt)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    async def _failed(self, exc: Exception) -> None:
        known = (ImapError, OSError, TimeoutError, StoreUnavailable,
                 aioimaplib.AioImapException)
        reason = str(exc) if isinstance(exc, ImapError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, known):
            log.error("%s: %s", self.name, reason)
        else:  # a bug: keep the traceback, keep the mailbox running
            log.exception("%s: unexpected error", self.name)
        self.health.connected = False
        self.health.mode = ""
        self.health.failures += 1
        self.health.last_error = reason[:2000]
        self.health.last_error_at = _now()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.store.save, None, self.health)

    # -- one session --------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ca = self.mailbox.ca_file
            self._ssl = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(self.settings.path(ca)) if ca else None)
        return self._ssl

    async def _connect(self) -> Connection:
        m = self.mailbox
        password = self.settings.imap_password(m)
        conn = Connection(m, self._ssl_context() if m.tls != "plain" else None)
        try:
            await conn.call(conn.client.wait_hello_from_server(), "connect")
            if m.tls == "starttls":
                await self._starttls(conn)
            check(await conn.call(conn.client.login(aioimaplib.quoted(m.user), password),
                                  "LOGIN"), "LOGIN")
            # Capabilities may differ after login (RFC 3501 section 7.2.1): ask again.
            await conn.call(conn.client.protocol.capability(), "CAPABILITY")
        except BaseException:
            conn.discard()
            raise
        self.stats.connects += 1
        return conn

    async def _starttls(self, conn: Connection) -> None:
        protocol = conn.client.protocol
        if "STARTTLS" not in conn.capabilities:
            # Never fall back to plain text silently.
            raise ImapError("the server does not offer STARTTLS; not logging in in plain text")
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        check(await conn.call(protocol.execute(command), "STARTTLS"), "STARTTLS")
        loop = asyncio.get_running_loop()
        transport = await conn.call(
            loop.start_tls(protocol.transport, protocol, self._ssl_context(),
                           server_hostname=self.mailbox.host),
            "TLS handshake")
        protocol.transport = transport
        # RFC 3501 section 6.2.1: capabilities learnt before STARTTLS must be discarded.
        await conn.call(protocol.capability(), "CAPABILITY")

    async def _session(self, conn: Connection) -> None:
        """Select, recover, then drain and wait until stopped."""
        m = self.mailbox
        selected = check(await conn.call(conn.client.select(mailbox_name(m.folder)),
                                         "SELECT"), f"SELECT {m.folder}")
        uidvalidity = parse_uidvalidity(selected.lines)
        position = await asyncio.to_thread(self.store.load)
        if position.uidvalidity != uidvalidity:
            if position.uidvalidity is not None:
                # RFC 3501 section 2.3.1.1: old UIDs are meaningless now. Start over; the
                # Message-ID dedup turns messages already ingested into no-ops.
                log.warning("%s: UIDVALIDITY changed from %s to %s; rescanning %s",
                            self.name, position.uidvalidity, uidvalidity, m.folder)
            position = Position(uidvalidity=uidvalidity)
            await asyncio.to_thread(self.store.save, position, None)
        self.position = position
        use_idle = m.idle and "IDLE" in conn.capabilities
        self.health.connected = True
        self.health.mode = "idle" if use_idle else "poll"
        await asyncio.to_thread(self.store.save, None, self.health)
        log.info("%s: connected to %s:%d as %s, folder %s (UIDVALIDITY %d), %s", self.name,
                 m.host, m.effective_port, m.user, m.folder, uidvalidity,
                 "IDLE" if use_idle else f"polling every {m.poll_interval_seconds:g}s")
        await self._recover(conn, position)
        while not self._stopping.is_set():
            await self._drain(conn, position)
            self._drained = True
            self.health.failures = 0
            self.health.last_success_at = _now()
            await asyncio.to_thread(self.store.save, position, self.health)
            if self._stopping.is_set():
                break
            if conn.take_exists():  # announced during the drain: drain again first
                continue
            if use_idle:
                await self._idle(conn)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), m.poll_interval_seconds)
                if not self._stopping.is_set():
                    check(await conn.call(conn.client.noop(), "NOOP"), "NOOP")

    async def _idle(self, conn: Connection) -> None:
        """IDLE (RFC 2177) until new mail, the restart time, or stop; then DONE."""
        client = conn.client
        queue = client.protocol.idle_queue
        while not queue.empty():  # pushes left over from the previous IDLE
            queue.get_nowait()
        # aioimaplib's own restart timer must never fire first: ours ends IDLE.
        idle = await conn.call(
            client.idle_start(timeout=self.mailbox.idle_restart_seconds * 2), "IDLE")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.mailbox.idle_restart_seconds
        while not self._stopping.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            lines = await conn.wait_push(remaining, self._stopping)
            if lines is None or lines == aioimaplib.STOP_WAIT_SERVER_PUSH:
                break
            if _wakes(lines):
                self.stats.idle_wakeups += 1
                break
        client.idle_done()
        check(await conn.call(idle, "IDLE DONE"), "IDLE")

    # -- ingest -------------------------------------------------------------------------

    async def _search_new(self, conn: Connection, last_uid: int) -> list[int]:
        conn.take_exists()  # what this SEARCH cannot see will be announced after it
        response = check(await conn.call(
            conn.client.uid_search("UID", f"{last_uid + 1}:*", charset=None), "UID SEARCH"),
            "UID SEARCH")
        # RFC 3501 section 6.4.8: "n:*" also matches the highest UID when it is below n.
        return sorted(uid for uid in set(parse_search(response.lines)) if uid > last_uid)

    async def _fetch(self, conn: Connection, uids: Sequence[int], items: str,
                     what: str) -> dict[int, Fetched]:
        response = check(await conn.call(
            conn.client.uid("fetch", uid_set(uids), items), what), what)
        return parse_fetch(response.lines)

    async def _drain(self, conn: Connection, position: Position) -> None:
        """Ingest everything above `position`, batch by batch.

        A committed batch is moved (or flagged) while the intake works on the next
        one: the server's MOVE overlaps the writer instead of adding to it. Fetching
        stays outside the writer's time on purpose: parsing a FETCH response in the
        event loop while the writer runs made both slower (they share the GIL).
        """
        m = self.mailbox
        unacked: _Ack | None = None
        self._busy = True
        try:
            while not self._stopping.is_set():
                uids = await self._search_new(conn, position.last_uid)
                if not uids:
                    break
                log.info("%s: %d new message(s)", self.name, len(uids))
                for chunk in _chunks(uids, m.batch_size):
                    sized = await self._fetch(conn, chunk, "(UID RFC822.SIZE)",
                                              "UID FETCH size")
                    sizes = {uid: f.size for uid, f in sized.items() if f.size is not None}
                    for batch in plan_batches(chunk, sizes, batch_size=m.batch_size,
                                              batch_bytes=m.batch_bytes,
                                              max_message_size=m.max_message_size):
                        if self._stopping.is_set() or (unacked and unacked.failure):
                            break
                        submitted = await self._submit(conn, position, batch, sizes)
                        if unacked is not None:
                            await self._acknowledge_batch(conn, position, unacked, submitted)
                        unacked = await self._settle(position, submitted)
                    if self._stopping.is_set() or (unacked and unacked.failure):
                        break
                if unacked is not None:
                    # Before the next SEARCH, or the end: nothing stays unacknowledged.
                    await self._acknowledge_batch(conn, position, unacked)
                    if unacked.failure is not None:
                        raise unacked.failure
                    unacked = None
        finally:
            self._busy = False

    async def _submit(self, conn: Connection, position: Position, batch: list[int],
                      sizes: dict[int, int]) -> _Submitted:
        """Fetch the batch's bodies and hand them to the intake (not awaited here)."""
        m = self.mailbox
        wanted = [uid for uid in batch if uid in sizes and sizes[uid] <= m.max_message_size]
        bodies: dict[int, bytes] = {}
        unfetchable: dict[int, str] = {}
        if wanted:
            bodies, unfetchable = await self._fetch_bodies(conn, position, wanted)
        self.stats.batches += 1
        self.stats.max_batch_messages = max(self.stats.max_batch_messages, len(bodies))
        self.stats.max_batch_bytes = max(self.stats.max_batch_bytes,
                                         sum(len(b) for b in bodies.values()))
        self.stats.largest_message = max([self.stats.largest_message,
                                          *(len(b) for b in bodies.values())])
        inbounds = {uid: self._inbound(raw) for uid, raw in sorted(bodies.items())}
        # The previous batch is settled (committed) before this one is fetched, so
        # every row a re-fetched message could have is visible here.
        held_ids = await asyncio.to_thread(
            self.store.held, [i.channel_message_id for i in inbounds.values()
                              if i.channel_message_id])
        held = [uid for uid, i in inbounds.items() if i.channel_message_id in held_ids]
        futures: dict[int, asyncio.Future[Disposition]] = {
            uid: asyncio.ensure_future(self.submit(inbound))
            for uid, inbound in inbounds.items() if uid not in held
        }
        return _Submitted(batch, sizes, futures, unfetchable, held)

    async def _fetch_bodies(self, conn: Connection, position: Position, wanted: list[int],
                            ) -> tuple[dict[int, bytes], dict[int, str]]:
        """The bodies of `wanted`, and the UIDs given up on (with why).

        One FETCH for the batch, unless a message of it failed before: then one FETCH
        per message, so a message the server cannot deliver is found and, after
        FETCH_ATTEMPTS sessions, quarantined instead of failing the batch forever.
        A failed FETCH usually ends the connection (Dovecot says BYE), so the counts
        are stored before the error ends the session.
        """
        failures = position.fetch_failures
        items, what = "(UID BODY.PEEK[])", "UID FETCH body"
        if not any(uid in failures for uid in wanted):
            try:
                fetched = await self._fetch(conn, wanted, items, what)
            except ImapError as exc:
                if len(wanted) == 1:
                    n, _ = failures.get(wanted[0], (0, ""))
                    failures[wanted[0]] = (n + 1, str(exc))
                else:  # which one? The next session fetches them one by one.
                    for uid in wanted:
                        failures[uid] = (0, str(exc))
                await asyncio.to_thread(self.store.save, position, None)
                raise
            return {uid: f.body for uid, f in fetched.items() if f.body is not None}, {}
        bodies: dict[int, bytes] = {}
        unfetchable: dict[int, str] = {}
        for uid in wanted:
            n, error = failures.get(uid, (0, ""))
            if n >= FETCH_ATTEMPTS:
                unfetchable[uid] = error
                continue
            try:
                fetched = await self._fetch(conn, [uid], items, f"UID FETCH body of UID {uid}")
            except ImapError as exc:
                failures[uid] = (n + 1, str(exc))
                log.warning("%s: UID %d could not be fetched (%d of %d attempts): %s",
                            self.name, uid, n + 1, FETCH_ATTEMPTS, exc)
                await asyncio.to_thread(self.store.save, position, None)
                raise
            failures.pop(uid, None)  # delivered: it was only in a failed batch
            body = fetched[uid].body if uid in fetched else None
            if body is not None:
                bodies[uid] = body
        return bodies, unfetchable

    async def _settle(self, position: Position, sub: _Submitted) -> _Ack:
        """Wait for the batch's commits and store how far they got (acknowledged later)."""
        m = self.mailbox
        if sub.futures:
            await asyncio.wait(sub.futures.values())
        done: list[int] = []
        quarantined: list[int] = []
        through = position.last_uid
        failure: BaseException | None = None
        for uid in sub.batch:
            if uid in sub.futures:
                failure = sub.futures[uid].exception()
                if failure is not None:
                    # Later messages may be committed too; acknowledging only up to here
                    # re-fetches them, and the Message-ID dedup makes that a no-op.
                    break
                outcome = sub.futures[uid].result().outcome
                (quarantined if outcome == Outcome.QUARANTINED else done).append(uid)
            elif uid in sub.held:
                log.info("%s: UID %d is in quarantine already; not ingested again, "
                         "moved to %s", self.name, uid, m.quarantine_folder)
                quarantined.append(uid)
            elif uid in sub.sizes and sub.sizes[uid] > m.max_message_size:
                log.error("%s: UID %d is %d bytes, over max_message_size %d; not fetched, "
                          "moved to %s", self.name, uid, sub.sizes[uid], m.max_message_size,
                          m.quarantine_folder)
                assert position.uidvalidity is not None
                await asyncio.to_thread(
                    self.store.record_oversized, uid,
                    self._channel_message_id(uid, position.uidvalidity), sub.sizes[uid],
                    m.max_message_size, m.quarantine_folder)
                quarantined.append(uid)
            elif uid in sub.unfetchable:
                attempts = position.fetch_failures.get(uid, (FETCH_ATTEMPTS, ""))[0]
                log.error("%s: UID %d could not be fetched in %d sessions (last: %s); "
                          "moved to %s", self.name, uid, attempts, sub.unfetchable[uid],
                          m.quarantine_folder)
                assert position.uidvalidity is not None
                await asyncio.to_thread(
                    self.store.record_unfetchable, uid,
                    self._channel_message_id(uid, position.uidvalidity), attempts,
                    sub.unfetchable[uid], m.quarantine_folder)
                quarantined.append(uid)
            else:
                log.info("%s: UID %d vanished before it was fetched", self.name, uid)
            through = uid
        if through > position.last_uid:
            position.last_uid = through
            position.pending_quarantine = quarantined
            # Failures of UIDs now behind the position are settled (quarantined or gone).
            position.fetch_failures = {uid: v for uid, v in position.fetch_failures.items()
                                       if uid > through}
            await asyncio.to_thread(self.store.save, position, None)
        return _Ack(through, done, quarantined, failure)

    async def _acknowledge_batch(self, conn: Connection, position: Position, ack: _Ack,
                                 meanwhile: _Submitted | None = None) -> None:
        """Move or flag a settled batch; `meanwhile` is the batch the intake works on."""
        if ack.through <= position.acked_uid:
            return
        try:
            await self._acknowledge(conn, position, uid_set(ack.done) if ack.done else None,
                                    ack.quarantined)
        except BaseException:
            if meanwhile is not None:
                # Abandoned: what it submitted still commits, is not acknowledged, and
                # is fetched again after the reconnect, where the dedup makes it a no-op.
                for future in meanwhile.futures.values():
                    future.add_done_callback(_consume)
            raise
        # Stored with the next batch's position or at the end of the drain: a crash
        # before that acknowledges this batch once more, which changes nothing.
        position.acked_uid = ack.through
        position.pending_quarantine = []
        position.copied = []  # all of it at or below acked_uid now
        self.health.ingested += len(ack.done) + len(ack.quarantined)

    def _inbound(self, raw: bytes) -> Inbound:
        return Inbound(
            channel=Channel.EMAIL, raw=raw, received_at=_now(), source=self.name,
            # IMAP has no envelope (DESIGN: mail_from None); the mailbox's address decides.
            mail_from=None, rcpt_tos=self._recipients(raw),
            channel_message_id=self._content_id(raw),
        )

    def _content_id(self, raw: bytes) -> str:
        """The message's own id in this mailbox: the SHA-256 of its bytes.

        The dedup key of mail without Message-ID, and how a held quarantine row is
        recognised. Not UIDVALIDITY:UID: after a UIDVALIDITY change the folder is
        rescanned, every message gets a new UID, and such mail would become a second
        ticket. Byte-identical mail in one mailbox is taken for the same delivery (a
        real second delivery differs at least in its Received or Delivered-To lines).
        """
        return f"{self.name}:sha256:{hashlib.sha256(raw).hexdigest()}"

    def _channel_message_id(self, uid: int, uidvalidity: int) -> str:
        """The id of a message that was not fetched (oversized, unfetchable): no
        bytes to hash, so its UID, valid under this UIDVALIDITY only."""
        return f"{self.name}:{uidvalidity}:{uid}"

    def _recipients(self, raw: bytes) -> tuple[str, ...]:
        """The mailbox's address, plus any of its `+` sub-addresses the headers name.

        A mailbox receives its address's sub-addresses too (help+<ticket>.<token>@),
        and the per-ticket reply token must reach the pipeline as a recipient;
        other addresses in the headers must not decide the inbound address (B2)."""
        own = self.mailbox.address
        local, _, domain = own.rpartition("@")
        found = [own]
        end = raw.find(b"\r\n\r\n")
        head = raw if end < 0 else raw[:end]
        if f"{local}+".encode() not in head.lower():
            return (own,)  # no sub-address anywhere in the headers: nothing to parse
        try:
            headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
            values = [str(v) for name in ("Delivered-To", "X-Original-To", "To", "Cc")
                      for v in headers.get_all(name, [])]
            pairs = getaddresses(values)
        except Exception:  # headers the parser cannot read: the pipeline will say why
            return (own,)
        for _, address in pairs:
            a = address.strip().lower()
            a_local, _, a_domain = a.rpartition("@")
            if a_domain == domain and a_local.startswith(f"{local}+") and a not in found:
                found.append(a)
        return tuple(found)

    # -- acknowledgement ----------------------------------------------------------------

    async def _recover(self, conn: Connection, position: Position) -> None:
        """Finish the acknowledgement a crash interrupted (committed, not moved/flagged)."""
        if position.acked_uid >= position.last_uid:
            return
        self._busy = True
        try:
            await self._finish_acknowledgement(conn, position)
        finally:
            self._busy = False

    async def _finish_acknowledgement(self, conn: Connection, position: Position) -> None:
        log.warning("%s: acknowledging UIDs %d:%d committed before an interruption",
                    self.name, position.acked_uid + 1, position.last_uid)
        await self._acknowledge(conn, position,
                                f"{position.acked_uid + 1}:{position.last_uid}",
                                position.pending_quarantine)
        position.acked_uid = position.last_uid
        position.pending_quarantine = []
        position.copied = []
        await asyncio.to_thread(self.store.save, position, None)

    async def _acknowledge(self, conn: Connection, position: Position, done: str | None,
                           quarantined: Sequence[int]) -> None:
        if quarantined:
            await self._move(conn, position, uid_set(quarantined),
                             self.mailbox.quarantine_folder)
        if done is None:
            return
        if self.mailbox.after == "move":
            await self._move(conn, position, done, self.mailbox.done_folder)
        else:
            check(await conn.call(
                conn.client.uid("store", done, "+FLAGS.SILENT", r"(\Seen)"), "UID STORE"),
                "UID STORE")

    async def _move(self, conn: Connection, position: Position, uids: str,
                    folder: str) -> None:
        """Move `uids` to `folder`, creating it when the server says it is missing.

        A UID set names messages that may be gone already; RFC 3501 section 6.4.8
        ignores non-existent UIDs, so repeating a move after a crash is harmless.
        Without MOVE, a COPY is not: the copies would be made twice. So what was
        copied is stored (`position.copied`) before the originals are marked and
        expunged, and a repeat only marks and expunges those."""
        target = mailbox_name(folder)
        caps = conn.capabilities
        to_copy: str | None = uids
        if "MOVE" not in caps:
            to_copy = uid_set_without(uids, position.copied)
        for attempt in range(2):
            if to_copy is None:  # copied before an interruption
                break
            if "MOVE" in caps:  # RFC 6851
                response = await conn.call(conn.client.uid("move", uids, target), "UID MOVE")
            else:
                response = await conn.call(conn.client.uid("copy", to_copy, target),
                                           "UID COPY")
            if response.result == "OK":
                break
            if attempt == 0 and await self._create_missing(conn, folder):
                continue
            check(response, f"moving to {folder}")
        if "MOVE" in caps:
            return
        if to_copy is not None:
            # Durable before the next step: a connection lost after this point leaves
            # only the marking and expunging to do.
            position.copied.append(to_copy)
            await asyncio.to_thread(self.store.save, position, None)
        check(await conn.call(conn.client.uid("store", uids, "+FLAGS.SILENT", r"(\Deleted)"),
                              "UID STORE"), "UID STORE")
        if "UIDPLUS" in caps:
            # RFC 4315: UID EXPUNGE removes only these messages. A plain EXPUNGE would
            # also remove what others marked \Deleted, so without UIDPLUS they stay
            # marked; the UID position keeps them from being ingested again.
            check(await conn.call(conn.client.uid("expunge", uids), "UID EXPUNGE"),
                  "UID EXPUNGE")

    async def _create_missing(self, conn: Connection, folder: str) -> bool:
        """CREATE `folder` if STATUS says it does not exist (RFC 3501 TRYCREATE case)."""
        target = mailbox_name(folder)
        status = await conn.call(conn.client.status(target, "(MESSAGES)"), "STATUS")
        if status.result == "OK":
            return False
        created = await conn.call(conn.client.create(target), "CREATE")
        if created.result != "OK":
            # Someone else (a person, another daemon) may have created it meanwhile
            # (RFC 5530 ALREADYEXISTS); only a folder that still is missing is an error.
            again = await conn.call(conn.client.status(target, "(MESSAGES)"), "STATUS")
            if again.result != "OK":
                check(created, f"CREATE {folder}")
            return True
        log.info("%s: created folder %s", self.name, folder)
        return True


def _wakes(lines: Sequence[bytes]) -> bool:
    """Whether lines pushed during IDLE mean new mail; BYE and UIDVALIDITY raise."""
    new_mail = False
    for line in lines:
        if not isinstance(line, bytes | bytearray):
            continue
        if line.startswith(b"BYE"):
            # RFC 3501 section 7.1.5: the server is closing the connection.
            raise ImapError(f"server said {bytes(line).decode('utf-8', 'replace')}")
        if b"[UIDVALIDITY " in line:
            raise ImapError("UIDVALIDITY changed while selected")
        if line.endswith(b" EXISTS"):
            new_mail = True
    return new_mail


