"""The IMAP channel against a real Dovecot (tests/support/dovecot.py), end to end.

Each test starts its own Dovecot on free loopback ports and a daemon whose
outbound mail goes to a loopback SMTP sink. Waiting is always for a condition
(`wait_until`, bounded), never a fixed sleep. The pure helpers (UID sets, FETCH
parsing, mailbox-name encoding, batching, backoff) and the [[imap]] settings get
plain unit tests at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from support.app import PG, Clock, demo_config
from support.app import truncate as _truncate
from support.corpus import CORPUS
from support.dovecot import Dovecot, dovecot_available
from support.mailer import make_mail
from support.sink import SmtpSink

from gateway import cli
from gateway.channels.imap import (
    Connection,
    ImapChannel,
    ImapError,
    backoff_delay,
    mailbox_name,
    parse_fetch,
    parse_search,
    plan_batches,
    uid_set,
    uid_set_without,
)
from gateway.config import ConfigError, Settings, parse_settings
from gateway.daemon import App
from gateway.mail.transport import SmtpTransport
from gateway.message import Channel, Inbound
from gateway.pipeline import Disposition
from gateway.store.models import ImapState, MessageId, QuarantineRow, Ticket

# A missing Dovecot fails these tests loudly instead of skipping them: the IMAP channel
# must never look tested when it was not.
needs_dovecot = pytest.mark.usefixtures("dovecot_installed")


@pytest.fixture
def dovecot_installed() -> None:
    assert dovecot_available(), "dovecot is not installed: apt-get install dovecot-imapd"


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    # Overrides conftest's two-backend fixture: these tests run on SQLite; the
    # PostgreSQL run of the store is test_idle_delivery_postgresql.
    return f"sqlite:///{tmp_path / 'helpdeskd.sqlite3'}"


@pytest.fixture
def dovecot_root() -> Iterator[Path]:
    # Not tmp_path: pytest's base directory is private to root, and Dovecot's
    # unprivileged processes must reach the mail directory.
    root = Path(tempfile.mkdtemp(prefix="helpdeskd-dovecot-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dovecot(dovecot_root: Path) -> Iterator[Dovecot]:
    with Dovecot(dovecot_root, users={"help": "secret", "catalogue": "secret2"}) as server:
        yield server
        # Shown by pytest only when the test failed: what the server saw.
        print(server.log()[-20_000:])


def mailbox(server: Dovecot, name: str = "help", user: str = "help",
            address: str = "help@helpdesk.test", **extra: Any) -> dict[str, Any]:
    """An [[imap]] entry for `server`, with timeouts and backoff scaled for tests."""
    entry: dict[str, Any] = {
        "name": name, "address": address, "host": server.host, "port": server.port,
        "tls": "plain", "allow_plaintext": True, "user": user,
        "password": server.users.get(user, "wrong"),
        "timeout_seconds": 5, "backoff_seconds": 0.05, "backoff_max_seconds": 0.5,
        "poll_interval_seconds": 0.1,
    }
    entry.update(extra)
    return entry


def make_settings(tmp_path: Path, db_url: str, *mailboxes: dict[str, Any]) -> Settings:
    data = demo_config(tmp_path, db_url, smtp={"enabled": False}, imap=list(mailboxes))
    return parse_settings(data, base_dir=tmp_path, environ={})


@contextlib.asynccontextmanager
async def running(settings: Settings, sink: SmtpSink, clock: Clock,
                  submit: Callable[[App], Callable[[Inbound], Awaitable[Disposition]]]
                  | None = None) -> AsyncIterator[App]:
    """A started daemon whose outbound mail goes to `sink`; `submit` may wrap App.submit."""
    transport = SmtpTransport("127.0.0.1", sink.port, starttls=False, username="",
                              password="", timeout=5)
    app = App(settings, clock=clock, transport=transport)
    if submit is not None:
        app.submit = submit(app)  # type: ignore[method-assign,assignment]
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def channel(app: App, name: str = "help") -> ImapChannel:
    found = [c for c in app.channels if isinstance(c, ImapChannel) and c.mailbox.name == name]
    assert found, name
    return found[0]


async def wait_until(predicate: Callable[[], Any], what: str, within: float = 30.0) -> None:
    """Poll `predicate` (sync, or async returning a bool) until true; fail after `within` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def count(app: App, model: Any) -> int:
    with app.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def tickets(app: App) -> list[Ticket]:
    with app.sessions() as s:
        return list(s.scalars(select(Ticket).order_by(Ticket.id)))


def state(app: App, name: str = "help") -> ImapState:
    """The mailbox's stored row (an empty one before the channel wrote anything)."""
    with app.sessions() as s:
        row = s.get(ImapState, name)
    return row or ImapState(name=name, last_uid=0, acked_uid=0, connected=False,
                            failures=0, ingested=0)


async def folder_count(server: Dovecot, folder: str, user: str = "help") -> int:
    return await asyncio.to_thread(server.count, user, folder)


async def ingested_all(app: App, n: int) -> bool:
    return count(app, Ticket) >= n


# -- delivery -----------------------------------------------------------------------------


async def _idle_delivery(settings: Settings, dovecot: Dovecot, sink: SmtpSink,
                         clock: Clock) -> None:
    async with running(settings, sink, clock) as app:
        ch = channel(app)
        await wait_until(lambda: ch.health.connected and ch.health.mode == "idle",
                         "the mailbox to be connected and idling")
        await asyncio.to_thread(dovecot.append, "help",
                                make_mail("Cannot log in", message_id="<idle-1@users.test>"))
        await wait_until(lambda: count(app, Ticket) == 1, "the ticket")
        [ticket] = tickets(app)
        assert (ticket.group, ticket.inbound_address, ticket.customer) == (
            "First Line", "help@helpdesk.test", "dana@users.test")
        assert ch.stats.idle_wakeups >= 1  # IDLE told us; no poll was involved
        # Moved only after the commit, to the folder created for it.
        await wait_until(lambda: folder_count(dovecot, "Processed"), "the move")
        assert await folder_count(dovecot, "INBOX") == 0
        [(flags, raw)] = await asyncio.to_thread(dovecot.messages, "help", "Processed")
        assert b"<idle-1@users.test>" in raw
        assert "\\Seen" not in flags  # BODY.PEEK[] set no flag
        # The acknowledgement and the agent notification go out like for SMTP mail.
        await sink.wait_for(2, timeout=30)
        # Health is stored after the drain that ingested the message.
        await wait_until(lambda: state(app).ingested == 1, "the stored health")
        row = state(app)
        assert row.connected and row.mode == "idle" and row.last_uid == 1 == row.acked_uid
        assert row.last_success_at is not None and row.last_error is None


@needs_dovecot
async def test_idle_delivery(tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink,
                             clock: Clock) -> None:
    await _idle_delivery(make_settings(tmp_path, db_url, mailbox(dovecot)), dovecot, sink, clock)


@needs_dovecot
async def test_idle_takes_each_message_in_turn(
    tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink, clock: Clock,
) -> None:
    # Dovecot may announce a new message in the answer to the SEARCH that just came
    # back empty; were that EXISTS dropped, IDLE would sleep until the next message
    # or its 25-minute restart. Each message here must arrive on its own.
    settings = make_settings(tmp_path, db_url, mailbox(dovecot))
    async with running(settings, sink, clock) as app:
        ch = channel(app)
        await wait_until(lambda: ch.health.mode == "idle", "IDLE")
        for i in range(8):
            await asyncio.to_thread(dovecot.append, "help", make_mail(f"turn {i}"))
            # The next APPEND races the acknowledgement and the SEARCH that follow.
            expected = i + 1
            await wait_until(lambda: count(app, Ticket) == expected, f"message {i}",  # noqa: B023
                             within=10)


@needs_dovecot
async def test_exists_outside_idle_is_noted(tmp_path: Path, dovecot: Dovecot) -> None:
    settings = make_settings(tmp_path, "sqlite://", mailbox(dovecot))
    conn = Connection(settings.imap[0], None)
    try:
        await conn.call(conn.client.wait_hello_from_server(), "connect")
        # aioimaplib logs such a line as "ignored untagged response"; we keep the news.
        conn.client.protocol.data_received(b"* 4 EXISTS\r\n")
        assert conn.take_exists() is True
        assert conn.take_exists() is False
    finally:
        conn.discard()


@needs_dovecot
@pytest.mark.postgres
@pytest.mark.skipif(not PG, reason="no PostgreSQL at 127.0.0.1:5432")
async def test_idle_delivery_postgresql(tmp_path: Path, pg_url: str, dovecot: Dovecot,
                                        sink: SmtpSink, clock: Clock) -> None:
    _truncate(pg_url)
    await _idle_delivery(make_settings(tmp_path, pg_url, mailbox(dovecot)), dovecot, sink, clock)


@needs_dovecot
@pytest.mark.parametrize("capability", ["IMAP4rev1 UIDPLUS LITERAL+", "IMAP4rev1 LITERAL+"],
                         ids=["uidplus", "bare"])
async def test_polling_when_idle_and_move_are_not_offered(
    tmp_path: Path, db_url: str, dovecot_root: Path, sink: SmtpSink, clock: Clock,
    capability: str,
) -> None:
    with Dovecot(dovecot_root, capability=capability) as server:
        settings = make_settings(tmp_path, db_url, mailbox(server))
        async with running(settings, sink, clock) as app:
            ch = channel(app)
            await wait_until(lambda: ch.health.connected, "the connection")
            assert ch.health.mode == "poll"
            await asyncio.to_thread(server.append, "help", make_mail("one"), make_mail("two"))
            await wait_until(lambda: count(app, Ticket) == 2, "both tickets")
            await wait_until(lambda: folder_count(server, "Processed"), "the copies")
            # Later polls must not ingest the copied originals again.
            polls = ch.health.last_success_at
            await wait_until(lambda: ch.health.last_success_at != polls, "another poll")
            await asyncio.to_thread(server.append, "help", make_mail("three"))
            await wait_until(lambda: count(app, Ticket) == 3, "the third ticket")
            await wait_until(lambda: state(app).acked_uid == 3, "the acknowledgement")
        inbox = await asyncio.to_thread(server.messages, "help", "INBOX")
        assert await folder_count(server, "Processed") == 3
        if "UIDPLUS" in capability:
            assert inbox == []  # COPY, \Deleted, UID EXPUNGE of exactly these (RFC 4315)
        else:
            # No UID EXPUNGE: a plain EXPUNGE could remove others' mail; they stay marked.
            assert [("\\Deleted" in flags) for flags, _ in inbox] == [True, True, True]
        with app.sessions() as s:
            inbound = s.scalar(select(func.count()).select_from(MessageId)
                               .where(MessageId.direction == "in"))
        assert inbound == 3


@needs_dovecot
async def test_copy_fallback_interrupted_after_the_copy_copies_once(
    tmp_path: Path, db_url: str, dovecot_root: Path, sink: SmtpSink, clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without MOVE: UID COPY answered OK, then the connection drops before STORE
    # \Deleted and UID EXPUNGE. The recovery must only mark and expunge: a second
    # COPY would leave every message twice in the done folder.
    original = Connection.call
    dropped = asyncio.Event()

    async def call(self: Connection, awaitable: Awaitable[Any], what: str,
                   within: float | None = None) -> Any:
        if what == "UID STORE" and not dropped.is_set():
            dropped.set()
            if asyncio.iscoroutine(awaitable):
                awaitable.close()  # never sent
            self.client.protocol.transport.close()
            raise ImapError("UID STORE: connection lost")
        return await original(self, awaitable, what, within)

    monkeypatch.setattr(Connection, "call", call)
    with Dovecot(dovecot_root, capability="IMAP4rev1 UIDPLUS IDLE LITERAL+") as server:
        await asyncio.to_thread(server.append, "help", *_messages(3, "copy"))
        settings = make_settings(tmp_path, db_url, mailbox(server))
        async with running(settings, sink, clock) as app:
            await wait_until(lambda: dropped.is_set() and state(app).acked_uid == 3,
                             "the interrupted acknowledgement to be finished")
            assert count(app, Ticket) == 3 and state(app).copied_uids == []
            assert channel(app).stats.connects >= 2
        assert await folder_count(server, "Processed") == 3
        assert await folder_count(server, "INBOX") == 0


@needs_dovecot
async def test_flag_mode_keeps_mail_and_ignores_what_a_person_read(
    tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink, clock: Clock,
) -> None:
    # A person read the first message before the daemon came: it is ingested all the same.
    await asyncio.to_thread(dovecot.append, "help", make_mail("read by a person"),
                            flags="(\\Seen)")
    await asyncio.to_thread(dovecot.append, "help", make_mail("unread"))
    await asyncio.to_thread(dovecot.append, "help", b"no header here, just words\r\n")
    settings = make_settings(tmp_path, db_url, mailbox(dovecot, after="flag"))
    async with running(settings, sink, clock) as app:
        await wait_until(lambda: state(app).acked_uid == 3, "the first three")
        assert count(app, Ticket) == 2 and count(app, QuarantineRow) == 1
        await asyncio.to_thread(dovecot.append, "help", make_mail("later"))
        await wait_until(lambda: count(app, Ticket) == 3, "the later ticket")
        await wait_until(lambda: state(app).acked_uid == 4, "its flag")
    inbox = await asyncio.to_thread(dovecot.messages, "help", "INBOX")
    assert len(inbox) == 3 and all("\\Seen" in flags for flags, _ in inbox)
    # Quarantined mail leaves the inbox even in flag mode; no done folder is made.
    assert await folder_count(dovecot, "Quarantine") == 1
    assert "Processed" not in await asyncio.to_thread(dovecot.folders)
    # A restart re-reads nothing: the position is stored, \Seen is not consulted.
    restarted = dt.datetime.now(dt.UTC)
    async with running(settings, sink, clock) as app:
        ch = channel(app)
        await wait_until(lambda: ch.health.last_success_at is not None
                         and ch.health.last_success_at > restarted, "a drain after restart")
        assert count(app, Ticket) == 3 and count(app, QuarantineRow) == 1


@needs_dovecot
async def test_folder_names_with_spaces_and_non_ascii(
    tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink, clock: Clock,
) -> None:
    await asyncio.to_thread(dovecot.create, "help", "Support Desk")
    await asyncio.to_thread(dovecot.append, "help", make_mail("hello"), folder="Support Desk")
    settings = make_settings(tmp_path, db_url, mailbox(
        dovecot, folder="Support Desk", done_folder="Erledigt Ä"))
    async with running(settings, sink, clock) as app:
        await wait_until(lambda: state(app).acked_uid == 1, "the move")
    # RFC 3501 section 5.1.3: modified UTF-7 on the wire.
    assert "Erledigt &AMQ-" in await asyncio.to_thread(dovecot.folders)
    assert await folder_count(dovecot, "Erledigt &AMQ-") == 1


# -- exactly once -------------------------------------------------------------------------


@needs_dovecot
async def test_uidvalidity_change_rescans_the_folder(
    tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink, clock: Clock,
) -> None:
    await asyncio.to_thread(dovecot.create, "help", "Support")
    old = make_mail("first", message_id="<uv-1@users.test>")
    await asyncio.to_thread(dovecot.append, "help", old,
                            make_mail("second", message_id="<uv-2@users.test>"), folder="Support")
    settings = make_settings(tmp_path, db_url, mailbox(dovecot, folder="Support"))
    async with running(settings, sink, clock) as app:
        await wait_until(lambda: state(app).acked_uid == 2, "the first two")
        before = state(app).uidvalidity
    # The folder is recreated (as a restore or a server migration does): UIDs restart
    # at 1 under a new UIDVALIDITY, below the stored position.
    await asyncio.to_thread(dovecot.delete, "help", "Support")
    await asyncio.to_thread(dovecot.create, "help", "Support")
    await asyncio.to_thread(dovecot.append, "help", make_mail("third"), old,
                            make_mail("fourth"), folder="Support")
    after = await asyncio.to_thread(dovecot.uidvalidity, "help", "Support")
    assert after != before
    async with running(settings, sink, clock) as app:
        await wait_until(lambda: state(app).uidvalidity == after
                         and state(app).acked_uid == 3, "the rescan")
        # The restored old message is a duplicate (B9), the two new ones are tickets.
        assert [t.subject for t in tickets(app)] == ["first", "second", "third", "fourth"]
    assert await folder_count(dovecot, "Support") == 0
    assert await folder_count(dovecot, "Processed") == 5


@needs_dovecot
async def test_uidvalidity_change_does_not_duplicate_mail_without_message_id(
    tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink, clock: Clock,
) -> None:
    # Flag mode keeps the mail in the folder; a restore recreates the folder with the
    # same bytes under a new UIDVALIDITY. Mail without Message-ID (scripts) is keyed on
    # its bytes in this mailbox, not on UIDVALIDITY:UID, so the rescan ingests it once.
    await asyncio.to_thread(dovecot.create, "help", "Support")
    await asyncio.to_thread(dovecot.append, "help", make_mail("script alert", message_id=None),
                            b"no header here, just words\r\n", folder="Support")
    settings = make_settings(tmp_path, db_url, mailbox(dovecot, folder="Support", after="flag"))
    async with running(settings, sink, clock) as app:
        await wait_until(lambda: state(app).acked_uid == 2, "the first ingest")
        before = state(app).uidvalidity
        assert count(app, Ticket) == 1 and count(app, QuarantineRow) == 1
    # A restore from before the quarantined one was moved out brings it back too.
    kept = [raw for _, raw in await asyncio.to_thread(dovecot.messages, "help", "Support")]
    assert len(kept) == 1
    await asyncio.to_thread(dovecot.delete, "help", "Support")
    await asyncio.to_thread(dovecot.create, "help", "Support")
    await asyncio.to_thread(dovecot.append, "help", *kept, b"no header here, just words\r\n",
                            make_mail("another alert", message_id=None), folder="Support")
    after = await asyncio.to_thread(dovecot.uidvalidity, "help", "Support")
    assert after != before
    async with running(settings, sink, clock) as app:
        await wait_until(lambda: state(app).uidvalidity == after
                         and state(app).acked_uid == 3, "the rescan")
        assert [t.subject for t in tickets(app)] == ["script alert", "another alert"]
        # The quarantined one is recognised by its bytes too: not held a second time.
        assert count(app, QuarantineRow) == 1


def _messages(n: int, tag: str) -> list[bytes]:
    return [make_mail(f"{tag} {i}", message_id=f"<{tag}-{i}@users.test>") for i in range(n)]


@needs_dovecot
async def test_crash_between_commit_and_move_neither_loses_nor_duplicates(
    tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink, clock: Clock,
) -> None:
    await asyncio.to_thread(dovecot.append, "help", *_messages(10, "crash"))
    settings = make_settings(tmp_path, db_url, mailbox(dovecot, batch_size=5))
    committed: list[Disposition] = []

    def crash_after_three(app: App) -> Callable[[Inbound], Awaitable[Disposition]]:
        original = app.submit

        async def submit(inbound: Inbound) -> Disposition:
            result = await original(inbound)
            committed.append(result)
            if len(committed) == 3:
                # The daemon dies: its task is gone before anything is acknowledged.
                task = channel(app)._task
                assert task is not None
                task.cancel()
            return result

        return submit

    async with running(settings, sink, clock, submit=crash_after_three) as app:
        task = channel(app)._task
        assert task is not None
        await wait_until(task.done, "the crash")
        await wait_until(lambda: len(committed) == 5, "the batch's other commits")
    assert await folder_count(dovecot, "Processed") == 0
    assert await folder_count(dovecot, "INBOX") == 10
    async with running(settings, sink, clock) as app:
        await wait_until(lambda: state(app).acked_uid == 10, "the rest")
        assert count(app, Ticket) == 10  # the five committed ones came back as duplicates
    assert await folder_count(dovecot, "Processed") == 10
    assert await folder_count(dovecot, "INBOX") == 0


@needs_dovecot
async def test_a_quarantined_message_fetched_again_is_not_quarantined_twice(
    tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink, clock: Clock,
) -> None:
    # The pipeline stores no dedup key for what it quarantines, so a message fetched
    # again (the crash window between the intake's commit and the stored position)
    # must be recognised by its held quarantine row.
    await asyncio.to_thread(
        dovecot.append, "help", make_mail("flaky", message_id="<flaky@users.test>"),
        *_messages(2, "ok"))
    settings = make_settings(tmp_path, db_url, mailbox(dovecot, batch_size=5))
    committed: list[Disposition] = []

    def break_routing(app: App) -> None:
        # A fault that quarantines "flaky" every time (stage "pipeline"), until fixed.
        original = app.intake.pipeline._ingest_mail

        def ingest_mail(session: Any, inbound: Inbound, mail: Any, now: Any) -> Any:
            if mail.subject == "flaky":
                raise RuntimeError("routing broke")
            return original(session, inbound, mail, now)

        app.intake.pipeline._ingest_mail = ingest_mail  # type: ignore[method-assign]

    def crash_after_three(app: App) -> Callable[[Inbound], Awaitable[Disposition]]:
        break_routing(app)
        original = app.submit

        async def submit(inbound: Inbound) -> Disposition:
            result = await original(inbound)
            committed.append(result)
            if len(committed) == 3:  # committed, position not stored: the daemon dies
                task = channel(app)._task
                assert task is not None
                task.cancel()
            return result

        return submit

    def still_broken(app: App) -> Callable[[Inbound], Awaitable[Disposition]]:
        break_routing(app)
        return app.submit

    async with running(settings, sink, clock, submit=crash_after_three) as app:
        await wait_until(lambda: len(committed) == 3, "the batch's commits")
        assert count(app, QuarantineRow) == 1 and state(app).last_uid == 0
    async with running(settings, sink, clock, submit=still_broken) as app:
        await wait_until(lambda: state(app).acked_uid == 3, "the re-fetch")
        assert count(app, Ticket) == 2  # the two good ones were duplicates (B9)
        with app.sessions() as s:
            [row] = s.scalars(select(QuarantineRow))  # not a second row
        assert (row.stage, row.state) == ("pipeline", "held")
        # An oversized message's row is not recorded twice for one UID either.
        store = channel(app).store
        for _ in range(2):
            await asyncio.to_thread(store.record_oversized, 9, "imap:help:1:9", 5000, 4000,
                                    "Quarantine")
        assert count(app, QuarantineRow) == 2
    assert await folder_count(dovecot, "Quarantine") == 1
    assert await folder_count(dovecot, "Processed") == 2
    # Fixed: `helpdeskd quarantine retry` (which ingests the stored row) still takes it.
    app = App(settings, clock=clock)
    try:
        with app.sessions() as s:
            q = s.get(QuarantineRow, row.id)
            assert q is not None
            inbound = Inbound(Channel(q.channel), q.raw, q.received_at, f"quarantine:{q.id}",
                              q.mail_from, tuple(q.rcpt_tos), q.channel_message_id)
        result = await asyncio.to_thread(app.intake.ingest_now, inbound)
        assert result.outcome.value == "created"
    finally:
        app.engine.dispose()


@needs_dovecot
async def test_stop_in_the_middle_of_a_batch_finishes_it_then_resumes(
    tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink, clock: Clock,
) -> None:
    await asyncio.to_thread(dovecot.append, "help", *_messages(10, "restart"))
    settings = make_settings(tmp_path, db_url, mailbox(dovecot, batch_size=5))
    third = asyncio.Event()

    def signal_third(app: App) -> Callable[[Inbound], Awaitable[Disposition]]:
        original = app.submit
        seen: list[Disposition] = []

        async def submit(inbound: Inbound) -> Disposition:
            result = await original(inbound)
            seen.append(result)
            if len(seen) == 3:
                third.set()
            return result

        return submit

    async with running(settings, sink, clock, submit=signal_third) as app:
        await third.wait()
        # Leaving the block stops the daemon in the middle of the first batch.
    row_processed = await folder_count(dovecot, "Processed")
    assert row_processed == 5  # the batch in hand was committed and moved, nothing more
    async with running(settings, sink, clock) as app:
        await wait_until(lambda: state(app).acked_uid == 10, "the second batch")
        assert count(app, Ticket) == 10
        with app.sessions() as s:
            subjects = sorted(s.scalars(select(Ticket.subject)))
        assert subjects == sorted(f"restart {i}" for i in range(10))
    assert await folder_count(dovecot, "INBOX") == 0


# -- failures -----------------------------------------------------------------------------


@needs_dovecot
async def test_server_killed_and_restarted(
    tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink, clock: Clock,
) -> None:
    settings = make_settings(tmp_path, db_url, mailbox(dovecot))
    async with running(settings, sink, clock) as app:
        ch = channel(app)
        await wait_until(lambda: ch.health.mode == "idle", "IDLE")
        await asyncio.to_thread(dovecot.append, "help", make_mail("before"))
        await wait_until(lambda: count(app, Ticket) == 1, "the first ticket")
        dovecot.kill()
        await wait_until(lambda: not state(app).connected and state(app).last_error,
                         "the failure to be recorded")
        assert ch.health.failures >= 1
        dovecot.start()  # same ports, same mail
        await wait_until(lambda: ch.health.connected and ch.health.mode == "idle",
                         "the reconnection")
        await asyncio.to_thread(dovecot.append, "help", make_mail("after"))
        await wait_until(lambda: count(app, Ticket) == 2, "the second ticket")
        assert ch.stats.connects >= 2
        await wait_until(lambda: state(app).failures == 0, "the reset by a good drain")
        assert state(app).last_error  # history: the last error is still shown


@needs_dovecot
async def test_silent_server_times_out_and_is_reconnected(
    tmp_path: Path, db_url: str, dovecot_root: Path, sink: SmtpSink, clock: Clock,
) -> None:
    import os
    import signal

    with Dovecot(dovecot_root, capability="IMAP4rev1 UIDPLUS MOVE LITERAL+") as server:
        settings = make_settings(tmp_path, db_url, mailbox(server, timeout_seconds=0.5))
        async with running(settings, sink, clock) as app:
            ch = channel(app)
            await wait_until(lambda: ch.health.connected, "the connection")
            pid = server._process.pid if server._process else 0
            os.killpg(pid, signal.SIGSTOP)  # the server hangs; the connection stays open
            try:
                await wait_until(lambda: ch.health.failures >= 2, "timeouts")
                assert "no answer within 0.5s" in (ch.health.last_error or "")
            finally:
                os.killpg(pid, signal.SIGCONT)
            await asyncio.to_thread(server.append, "help", make_mail("after the hang"))
            await wait_until(lambda: count(app, Ticket) == 1, "the ticket")


@needs_dovecot
async def test_bad_and_oversized_messages_are_moved_to_quarantine(
    tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink, clock: Clock,
) -> None:
    big = make_mail("huge", body="x" * 80 + "\n" * 100 + "y" * 5000)
    await asyncio.to_thread(
        dovecot.append, "help", b"This is no mail at all, only words.\r\n", big,
        make_mail("fine", message_id="<fine@users.test>"))
    settings = make_settings(tmp_path, db_url, mailbox(dovecot, max_message_size=4000))
    async with running(settings, sink, clock) as app:
        await wait_until(lambda: state(app).acked_uid == 3, "all three")
        [ticket] = tickets(app)
        assert ticket.subject == "fine"  # the inbox did not jam
        with app.sessions() as s:
            rows = list(s.scalars(select(QuarantineRow).order_by(QuarantineRow.stage)))
        # The oversized one is listed too (B20), with where it is: it has no bytes here.
        big_row, held = rows
        assert (big_row.stage, big_row.reason) == ("fetch", "too-large")
        assert "Quarantine" in big_row.detail and big_row.source == "imap:help"
        assert held.source == "imap:help" and held.stage == "parse"
        assert held.channel_message_id is not None
        assert held.channel_message_id.startswith("imap:help:")
        assert held.rcpt_tos == ["help@helpdesk.test"]
    quarantined = await asyncio.to_thread(dovecot.messages, "help", "Quarantine")
    assert len(quarantined) == 2  # the unparseable one and the oversized one (not fetched)
    assert await folder_count(dovecot, "Processed") == 1
    assert await folder_count(dovecot, "INBOX") == 0


def _make_unreadable(root: Path, marker: bytes) -> None:
    """Make the maildir file holding `marker` unreadable to Dovecot (which runs
    unprivileged): the server then answers a FETCH of its body with BYE."""
    [path] = [p for p in (root / "mail" / "help").glob("*/*")
              if p.parent.name in ("new", "cur") and marker in p.read_bytes()]
    path.chmod(0)


@needs_dovecot
async def test_a_message_the_server_cannot_deliver_does_not_jam_the_mailbox(
    tmp_path: Path, db_url: str, dovecot_root: Path, dovecot: Dovecot, sink: SmtpSink,
    clock: Clock,
) -> None:
    # Dovecot answers the FETCH of an unreadable message with "BYE FETCH failed:
    # Internal error", every time. The batch is retried one message at a time, and the
    # culprit, after failing in FETCH_ATTEMPTS sessions, is quarantined; the rest of
    # the batch (and what follows it) is ingested.
    await asyncio.to_thread(
        dovecot.append, "help", make_mail("fine 0", message_id="<fine-0@users.test>"),
        make_mail("broken", message_id="<broken@users.test>"),
        *[make_mail(f"fine {i}", message_id=f"<fine-{i}@users.test>") for i in (1, 2)])
    _make_unreadable(dovecot_root, b"<broken@users.test>")
    settings = make_settings(tmp_path, db_url, mailbox(dovecot))
    async with running(settings, sink, clock) as app:
        await wait_until(lambda: state(app).acked_uid == 4, "the four messages")
        assert [t.subject for t in tickets(app)] == ["fine 0", "fine 1", "fine 2"]
        with app.sessions() as s:
            [row] = s.scalars(select(QuarantineRow))
        assert (row.stage, row.reason, row.source) == ("fetch", "unfetchable", "imap:help")
        assert row.channel_message_id is not None and row.channel_message_id.endswith(":2")
        # Readable: which message, how often, and the server's own words.
        assert "UID 2" in row.detail and "3 sessions" in row.detail
        assert "FETCH failed" in row.detail and "Quarantine" in row.detail
        assert "server said BYE FETCH failed" in (state(app).last_error or "")
        assert state(app).fetch_failures == {}  # settled, nothing left to count
    assert await folder_count(dovecot, "Quarantine") == 1
    assert await folder_count(dovecot, "Processed") == 3
    assert await folder_count(dovecot, "INBOX") == 0


@needs_dovecot
async def test_two_mailboxes_two_groups_and_a_failing_one(
    tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink, clock: Clock,
) -> None:
    settings = make_settings(
        tmp_path, db_url,
        mailbox(dovecot),
        mailbox(dovecot, name="catalogue", user="catalogue", address="catalogue@helpdesk.test"),
        # Wrong password: keeps failing, and must not hold up the others.
        mailbox(dovecot, name="broken", user="nobody-here", folder="Other"),
    )
    await asyncio.to_thread(dovecot.append, "help", make_mail("for first line"))
    # The To header names help@, but it sits in the catalogue mailbox: the mailbox decides.
    await asyncio.to_thread(dovecot.append, "catalogue", make_mail("for catalogue"))
    async with running(settings, sink, clock) as app:
        await wait_until(lambda: count(app, Ticket) == 2, "both tickets")
        groups = {t.subject: (t.group, t.inbound_address) for t in tickets(app)}
        assert groups == {
            "for first line": ("First Line", "help@helpdesk.test"),
            "for catalogue": ("Catalogue Support", "catalogue@helpdesk.test"),
        }
        broken = channel(app, "broken")
        await wait_until(lambda: broken.health.failures >= 2, "the broken mailbox to retry")
        assert "LOGIN" in (broken.health.last_error or "")
        report = cli.imap_status(app.settings, app.sessions)
    by_name = {r["name"]: r for r in report}
    assert by_name["help"]["last_error"] is None and by_name["help"]["ingested"] == 1
    assert by_name["broken"]["failures"] >= 2 and by_name["broken"]["connected"] is False
    assert by_name["catalogue"]["address"] == "catalogue@helpdesk.test"


@needs_dovecot
async def test_status_command(tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink,
                              clock: Clock, capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(tmp_path, db_url, mailbox(dovecot))
    await asyncio.to_thread(dovecot.append, "help", make_mail("status"))
    async with running(settings, sink, clock) as app:
        await wait_until(lambda: state(app).acked_uid == 1, "the message")
    (tmp_path / "no-rules").mkdir()
    config = tmp_path / "helpdeskd.toml"
    config.write_text(f"""
[daemon]
database_url = "{db_url}"
secret = "test-secret-0123456789abcdef"
rules_dir = "{tmp_path / 'no-rules'}"
[smtp]
enabled = false
[[inbound]]
address = "help@helpdesk.test"
default_group = "First Line"
[[groups]]
name = "First Line"
[[imap]]
name = "help"
address = "help@helpdesk.test"
host = "{dovecot.host}"
port = {dovecot.port}
tls = "plain"
allow_plaintext = true
user = "help"
password = "secret"
[[imap]]
name = "never"
address = "help@helpdesk.test"
host = "{dovecot.host}"
port = {dovecot.port}
tls = "plain"
allow_plaintext = true
user = "help"
folder = "Never"
password = "secret"
""")
    assert cli.main(["status", "--json", "--config", str(config)]) == 0
    data = json.loads(capsys.readouterr().out)
    help_box, never = data["imap"]
    assert help_box["name"] == "help" and help_box["ingested"] == 1
    assert help_box["connected"] is False  # the daemon stopped and said so
    assert help_box["last_success_at"] and help_box["updated_at"]
    assert never["name"] == "never" and never["updated_at"] is None
    assert cli.main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "help" in text and "never connected" in text


# -- TLS ------------------------------------------------------------------------------------


@needs_dovecot
@pytest.mark.parametrize("mode", ["implicit", "starttls"])
async def test_tls(tmp_path: Path, db_url: str, dovecot_root: Path, sink: SmtpSink,
                   clock: Clock, mode: str) -> None:
    with Dovecot(dovecot_root, tls=True) as server:
        port = server.imaps_port if mode == "implicit" else server.port
        shutil.copy(server.cert_file, tmp_path / "ca.pem")
        settings = make_settings(tmp_path, db_url, mailbox(
            server, tls=mode, allow_plaintext=False, port=port, ca_file="ca.pem"))
        await asyncio.to_thread(server.append, "help", make_mail(f"over {mode}"))
        async with running(settings, sink, clock) as app:
            await wait_until(lambda: count(app, Ticket) == 1, "the ticket")
        assert "secured" in server.log() or "TLS" in server.log()


@needs_dovecot
async def test_tls_is_never_silently_dropped(tmp_path: Path, db_url: str, dovecot_root: Path,
                                             sink: SmtpSink, clock: Clock) -> None:
    # A server without STARTTLS, and a certificate nobody vouches for: both refused.
    with Dovecot(dovecot_root, tls=False) as plain:
        settings = make_settings(tmp_path, db_url,
                                 mailbox(plain, tls="starttls", allow_plaintext=False))
        async with running(settings, sink, clock) as app:
            ch = channel(app)
            await wait_until(lambda: ch.health.failures >= 1, "the refusal")
            assert "does not offer STARTTLS" in (ch.health.last_error or "")
    self_signed = dovecot_root / "tls"
    self_signed.mkdir()
    with Dovecot(self_signed, tls=True) as server:
        settings = make_settings(tmp_path, db_url, mailbox(
            server, tls="implicit", allow_plaintext=False, port=server.imaps_port))
        async with running(settings, sink, clock) as app:
            ch = channel(app)
            await wait_until(lambda: ch.health.failures >= 1, "the refusal")
            assert "CERTIFICATE_VERIFY_FAILED" in (ch.health.last_error or "")


# -- agent replies and the corpus ----------------------------------------------------------


@needs_dovecot
async def test_agent_reply_through_the_mailbox_is_relayed(
    tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink, clock: Clock,
) -> None:
    settings = make_settings(tmp_path, db_url, mailbox(dovecot))
    await asyncio.to_thread(dovecot.append, "help",
                            make_mail("Portal down", message_id="<c-1@users.test>"))
    async with running(settings, sink, clock) as app:
        await sink.wait_for(2, timeout=30)
        [note] = [m for m in sink.messages if "alice@agents.test" in m.rcpt_tos]
        token_address = note.message["Reply-To"].addresses[0].addr_spec
        assert token_address.startswith("help+")
        # The provider delivers help+<ticket>.<token>@ into the help@ mailbox.
        reply = make_mail(f"Re: {note.message['Subject']}", "It works again now.\n",
                          sender="Alice <alice@agents.test>", to=token_address,
                          in_reply_to=note.message["Message-ID"])
        await asyncio.to_thread(dovecot.append, "help", reply)
        await sink.wait_for(3, timeout=30)
        relay = [m for m in sink.messages if "dana@users.test" in m.rcpt_tos][-1]
        assert "It works again now." in relay.message.get_content()
        [ticket] = tickets(app)
        assert ticket.state == "open"


@needs_dovecot
async def test_public_corpus_is_drained_in_bounded_batches(
    tmp_path: Path, db_url: str, dovecot: Dovecot, sink: SmtpSink, clock: Clock,
) -> None:
    files = sorted(CORPUS.rglob("*.eml"))
    assert len(files) == 296, f"corpus not found under {CORPUS}"
    with dovecot.client("help") as imap:
        for path in files:
            typ, data = await asyncio.to_thread(imap.append, "INBOX", None, None,
                                                path.read_bytes())
            assert typ == "OK", (path, data)
    settings = make_settings(tmp_path, db_url, mailbox(
        dovecot, batch_size=40, batch_bytes=256 * 1024))
    async with running(settings, sink, clock) as app:
        ch = channel(app)
        await wait_until(lambda: state(app).acked_uid == len(files), "the corpus", within=60)
        assert ch.stats.max_batch_messages <= 40
        # A batch stays within batch_bytes unless one message alone is larger.
        assert ch.stats.max_batch_bytes <= max(256 * 1024, ch.stats.largest_message)
        held = count(app, QuarantineRow)
    processed = await folder_count(dovecot, "Processed")
    quarantine = await folder_count(dovecot, "Quarantine")
    assert await folder_count(dovecot, "INBOX") == 0
    assert processed + quarantine == len(files)  # every message has a place
    assert quarantine == held  # and the quarantined ones are in the store too


# -- configuration ----------------------------------------------------------------------------


BASE = {"name": "help", "address": "help@helpdesk.test", "host": "imap.example.test",
        "user": "help"}


def _settings(tmp_path: Path, *entries: dict[str, Any],
              environ: dict[str, str] | None = None) -> Settings:
    data = demo_config(tmp_path, "sqlite://", imap=list(entries))
    return parse_settings(data, base_dir=tmp_path, environ=environ or {})


def test_config_defaults(tmp_path: Path) -> None:
    [m] = _settings(tmp_path, {**BASE, "password": "pw"}).imap
    assert (m.tls, m.effective_port, m.folder, m.after, m.done_folder, m.quarantine_folder) == (
        "implicit", 993, "INBOX", "move", "Processed", "Quarantine")
    assert m.idle_restart_seconds == 25 * 60
    [m] = _settings(tmp_path, {**BASE, "password": "pw", "tls": "starttls"}).imap
    assert m.effective_port == 143


@pytest.mark.parametrize(("entry", "message"), [
    ({"tls": "plain", "password": "pw"}, "allow_plaintext"),
    ({"password": "pw", "idle_restart_seconds": 29 * 60}, "idle_restart_seconds"),
    ({}, "no password: set password_file or HELPDESKD_IMAP__HELP__PASSWORD"),
    ({"password": "pw", "password_file": "pw.txt"}, "not both"),
    ({"password": "pw", "address": "nobody@helpdesk.test"}, "not an [[inbound]] address"),
    ({"password": "pw", "done_folder": "INBOX"}, "done_folder"),
    ({"password": "pw", "ca_file": "missing.pem"}, "ca_file"),
    ({"password": "pw", "batch_size": 201}, "batch_size"),
])
def test_config_refuses(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, {**BASE, **entry})
    assert message in str(info.value)


def test_config_refuses_two_entries_for_one_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="same server, user and folder"):
        _settings(tmp_path, {**BASE, "password": "pw"}, {**BASE, "name": "b", "password": "pw"})


def test_password_from_environment_and_file(tmp_path: Path) -> None:
    settings = _settings(tmp_path, {**BASE, "name": "help-desk"},
                         environ={"HELPDESKD_IMAP__HELP_DESK__PASSWORD": "from-env"})
    assert settings.imap_password(settings.imap[0]) == "from-env"
    (tmp_path / "pw.txt").write_text("from-file\n")
    settings = _settings(tmp_path, {**BASE, "password_file": "pw.txt"})
    assert settings.imap_password(settings.imap[0]) == "from-file"
    assert "from-file" not in repr(settings)


# -- pure helpers ----------------------------------------------------------------------------


def test_mailbox_name_modified_utf7() -> None:
    # The example of RFC 3501 section 5.1.3.
    assert mailbox_name("~peter/mail/台北/日本語") == '"~peter/mail/&U,BTFw-/&ZeVnLIqe-"'
    assert mailbox_name("A&B \"x\"") == '"A&-B \\"x\\""'


def test_uid_set() -> None:
    assert uid_set([9, 3, 4, 5, 12, 13, 7]) == "3:5,7,9,12:13"
    assert uid_set([1]) == "1"


def test_uid_set_without() -> None:
    assert uid_set_without("4:900000", ["5", "7:8"]) == "4,6,9:900000"
    assert uid_set_without("3:5,7", ["1:4", "7"]) == "5"
    assert uid_set_without("3:5", ["3:5"]) is None
    assert uid_set_without("3:5", []) == "3:5"


def test_parse_fetch_and_search() -> None:
    lines: list[Any] = [
        b"1 FETCH (UID 7 BODY[] {5}", bytearray(b"hello"), b")",
        b"2 FETCH (FLAGS (\\Seen))",  # unsolicited: another client changed a flag
        b"3 FETCH (BODY[] {3}", bytearray(b"abc"), b" UID 9)",  # UID after the literal
        b"4 FETCH (UID 10 RFC822.SIZE 1234)",
        b"Fetch completed.",
    ]
    found = parse_fetch(lines)
    assert {u: (f.size, f.body) for u, f in found.items()} == {
        7: (None, b"hello"), 9: (None, b"abc"), 10: (1234, None)}
    assert parse_search([b"3 4 10", b"Search completed."]) == [3, 4, 10]
    assert parse_search([b"", b"Search completed."]) == []


def test_plan_batches_bounds_count_and_bytes() -> None:
    sizes = {1: 100, 2: 100, 3: 900, 4: 50, 5: 10_000, 6: 10}
    assert plan_batches([1, 2, 3, 4, 5, 6], sizes, batch_size=3, batch_bytes=1000,
                        max_message_size=5000) == [[1, 2], [3, 4, 5], [6]]


def test_backoff_is_capped_and_jittered() -> None:
    assert backoff_delay(0, 1, 300, lambda: 0.0) == 0.5
    assert backoff_delay(3, 1, 300, lambda: 1.0) == 8
    assert backoff_delay(50, 1, 300, lambda: 1.0) == 300

