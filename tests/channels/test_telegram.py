"""End to end over the Telegram channel: a loopback Bot API stand-in, real SMTP for agents.

A user writes to the bot (the stand-in plays Telegram, the daemon's PTB polls it
or receives its webhook calls); the ticket's agents get email at the SMTP sink;
an agent answers by email to the tokened Reply-To; the answer arrives in the chat.
Nothing waits on a timer: every wait is for a condition, with a timeout.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import email.utils
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from support.botapi import BotApi, FakeBot, guard_real_telegram
from support.mailer import make_mail, send
from support.sink import SmtpSink, free_port

from gateway.channels.smtp import SmtpChannel
from gateway.channels.telegram import TelegramChannel
from gateway.cli import ticket_detail
from gateway.config import Settings, parse_settings
from gateway.daemon import App
from gateway.mail.transport import SmtpTransport
from gateway.store.db import make_sessionmaker
from gateway.store.models import Article, OutboxRow, QuarantineRow, Ticket

HELP_TOKEN = "1001:help-token"
CAT_TOKEN = "1002:cat-token"
SECRET = "webhook-secret_123"
DANA = 5551

# PTB 22 warns about RetryAfter's future type while building the exception itself.
pytestmark = pytest.mark.filterwarnings("ignore:.*retry_after.*:DeprecationWarning")

TELEGRAM_RULES = """\
rules:
  - name: telegram-asap
    when: {channel: {equals: telegram}, subject: {contains: "asap"}}
    then: {priority: high}
"""


@pytest.fixture
async def api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[BotApi]:
    attempts = guard_real_telegram(monkeypatch)
    async with BotApi() as stand_in:
        stand_in.add_bot(HELP_TOKEN, "helpbot")
        stand_in.add_bot(CAT_TOKEN, "catbot")
        yield stand_in
    assert not attempts, f"a test tried to reach the real Telegram: {attempts}"


class Daemon:
    """One running App wired to the stand-in and the SMTP sink, plus test helpers."""

    def __init__(self, settings: Settings, api: BotApi, sink: SmtpSink, clock: Any) -> None:
        self.settings = settings
        self.api = api
        self.sink = sink
        self.clock = clock
        self.app: App | None = None
        self.helpbot = api.bots[HELP_TOKEN]
        self.catbot = api.bots[CAT_TOKEN]

    async def start(self) -> App:
        transport = SmtpTransport("127.0.0.1", self.sink.port, starttls=False, username="",
                                  password="", timeout=5)
        app = App(self.settings, clock=self.clock, transport=transport)
        await app.start()
        self.app = app
        for channel in app.channels:
            if isinstance(channel, TelegramChannel):
                await self.api.wait_until(channel.ready.is_set, what=f"{channel.name} ready")
        return app

    async def stop(self) -> None:
        if self.app is not None:
            await self.app.stop()
            self.app = None

    @property
    def smtp_port(self) -> int:
        assert self.app is not None
        return int(next(c.port for c in self.app.channels if isinstance(c, SmtpChannel)))

    def tickets(self) -> list[dict[str, Any]]:
        assert self.app is not None
        with self.app.sessions() as s:
            numbers = list(s.scalars(select(Ticket.number).order_by(Ticket.id)))
        return [d for n in numbers if (d := ticket_detail(self.app, n)) is not None]

    def quarantined(self) -> int:
        assert self.app is not None
        with self.app.sessions() as s:
            return len(list(s.scalars(select(QuarantineRow.id))))

    def outbox(self, channel: str = "telegram") -> list[OutboxRow]:
        assert self.app is not None
        with self.app.sessions() as s:
            return list(s.scalars(select(OutboxRow).where(OutboxRow.channel == channel)
                                  .order_by(OutboxRow.id)))

    async def until(self, predicate: Callable[[], Any], what: str = "condition") -> None:
        await self.api.wait_until(predicate, what=what)

    async def texts(self, bot: FakeBot, chat_id: int, count: int) -> list[str]:
        """Wait until the chat has received at least `count` texts; returns them all."""
        await self.until(lambda: len(bot.texts(chat_id)) >= count,
                         what=f"{count} message(s) to chat {chat_id}")
        return bot.texts(chat_id)

    async def mails_to(self, address: str, count: int) -> list[EmailMessage]:
        def mine() -> list[EmailMessage]:
            return [_parsed(m.raw) for m in self.sink.messages if address in m.rcpt_tos]

        await self.until(lambda: len(mine()) >= count, what=f"{count} mail(s) to {address}")
        return mine()

    async def agent_reply(
        self, notification: EmailMessage, body: str, *, agent: str = "alice@agents.test",
        attachments: tuple[tuple[str, str, bytes], ...] = (),
    ) -> None:
        """An agent answers a notification by email, to its tokened Reply-To."""
        reply_to = notification["Reply-To"].addresses[0].addr_spec
        msg = EmailMessage()
        msg["From"] = f"Alice <{agent}>"
        msg["To"] = reply_to
        msg["Subject"] = "Re: " + str(notification["Subject"])
        msg["Message-ID"] = email.utils.make_msgid(domain="agents.test")
        msg["In-Reply-To"] = notification["Message-ID"]
        msg.set_content(body)
        for name, ctype, data in attachments:
            maintype, subtype = ctype.split("/")
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
        code, text = await send(self.smtp_port, msg.as_bytes(policy=SMTP_POLICY),
                                mail_from=agent, rcpt_to=(reply_to,))
        assert code == 250 and "agent-reply" in text, text


def _parsed(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _bot_config(api: BotApi, name: str, token: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name, "token": token, "base_url": api.base_url,
        "base_file_url": api.base_file_url, "poll_timeout": 5,
        # No pacing in tests: Telegram's limits are not what is tested here.
        "chat_interval_seconds": 0, "bot_interval_seconds": 0, **extra,
    }


MakeDaemon = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def make_daemon(
    settings: Settings, api: BotApi, sink: SmtpSink, clock: Any, tmp_path: Path
) -> AsyncIterator[MakeDaemon]:
    started: list[Daemon] = []
    (tmp_path / "rules" / "20-telegram.yaml").write_text(TELEGRAM_RULES)

    async def make(mode: str = "polling", start: bool = True) -> Daemon:
        port = free_port()
        helpbot = _bot_config(api, "helpbot", HELP_TOKEN, inbound_address="help@helpdesk.test",
                              mode=mode)
        if mode == "webhook":
            helpbot.update(webhook_url=f"http://127.0.0.1:{port}/telegram/helpbot",
                           webhook_secret=SECRET)
        catbot = _bot_config(api, "catbot", CAT_TOKEN, inbound_address="catalogue@helpdesk.test",
                             default_group="Catalogue Support", allow_groups=True)
        data = settings.model_dump()
        data.pop("base_dir")
        data["telegram"] = [helpbot, catbot]
        data["http"] = {"host": "127.0.0.1", "port": port}
        daemon = Daemon(parse_settings(data, base_dir=tmp_path, environ={}), api, sink, clock)
        started.append(daemon)
        if start:
            await daemon.start()
        return daemon

    yield make
    for daemon in started:
        await daemon.stop()


async def _new_ticket(d: Daemon, text: str = "Cannot log in to the portal") -> dict[str, Any]:
    """Dana opens a ticket on helpbot; returns it once acknowledged in the chat."""
    before = len(d.helpbot.texts(DANA))
    d.helpbot.message(DANA, text)
    await d.texts(d.helpbot, DANA, before + 1)
    return d.tickets()[-1]


# -- the whole path ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["polling", "webhook"])
async def test_chat_to_agent_email_and_reply_back_to_chat(
    make_daemon: MakeDaemon, mode: str
) -> None:
    d = await make_daemon(mode)
    bot = d.helpbot
    if mode == "webhook":
        [call] = bot.calls("setWebhook")
        assert call.params["url"].endswith("/telegram/helpbot")
        assert call.params["secret_token"] == SECRET
        assert not bot.calls("getUpdates")
    else:
        assert bot.calls("deleteWebhook")

    bot.message(DANA, "/start")
    [welcome] = await d.texts(bot, DANA, 1)
    assert "EOSC Helpdesk" in welcome and "/new" in welcome
    assert d.tickets() == []  # a command is no ticket

    bot.message(DANA, "Cannot log in to the portal\nIt says: access denied.")
    texts = await d.texts(bot, DANA, 2)
    [ticket] = d.tickets()
    hook = f"[Ticket#{ticket['number']}]"
    assert hook in texts[1]  # the chat acknowledgement
    assert (ticket["channel"], ticket["group"], ticket["state"]) == ("telegram", "First Line",
                                                                     "new")
    assert ticket["customer"] == f"telegram:{DANA}"
    assert ticket["customer_name"] == "Dana User"
    assert ticket["subject"] == "Cannot log in to the portal"
    assert ticket["inbound_address"] == "help@helpdesk.test"
    [article] = ticket["articles"]
    assert "access denied" in article["body"] and article["channel"] == "telegram"

    # B7: the group's agent is told by email, with a tokened Reply-To.
    [note] = await d.mails_to("alice@agents.test", 1)
    assert hook in note["Subject"] and "Cannot log in to the portal" in note["Subject"]
    assert note["From"].addresses[0].addr_spec == "help@helpdesk.test"
    body = note.get_body(("plain",))
    assert body is not None and "access denied" in body.get_content()
    # Nobody is mailed at the chat's pseudo-address.
    assert all(not r.startswith("telegram:") for m in d.sink.messages for r in m.rcpt_tos)

    await d.agent_reply(note, (
        "Please clear your browser cache and try again.\n\n"
        "On Fri, 27 Nov 2026 at 10:00, EOSC Helpdesk <help@helpdesk.test> wrote:\n"
        "> Cannot log in to the portal\n> It says: access denied.\n"))
    texts = await d.texts(bot, DANA, 3)
    assert "Please clear your browser cache and try again." in texts[2]
    assert "access denied" not in texts[2] and "wrote:" not in texts[2]
    assert d.tickets()[0]["state"] == "open"  # B10: first relayed agent reply

    # A follow-up in the chat lands on the same ticket and is mailed to the agent.
    bot.message(DANA, "That worked, thanks!")
    await d.mails_to("alice@agents.test", 2)
    [ticket] = d.tickets()
    assert [a["body"] for a in ticket["articles"]][-1] == "That worked, thanks!"

    bot.message(DANA, "/status")
    status = (await d.texts(bot, DANA, 4))[3]
    assert hook in status and "open" in status

    bot.message(DANA, "/close")
    closed = (await d.texts(bot, DANA, 5))[4]
    assert hook in closed
    assert d.tickets()[0]["state"] == "closed"

    # The chat's next message opens a new ticket rather than reviving the closed one.
    bot.message(DANA, "Another question")
    await d.texts(bot, DANA, 6)
    assert [t["state"] for t in d.tickets()] == ["closed", "new"]
    if mode == "webhook":
        assert {status for _, status in bot.webhook_deliveries} == {200}


async def test_an_address_copied_with_cc_gets_the_agents_reply_to_a_chat_by_mail(
    make_daemon: MakeDaemon,
) -> None:
    d = await make_daemon()
    ticket = await _new_ticket(d)
    hook = f"[Ticket#{ticket['number']}]"
    [note] = await d.mails_to("alice@agents.test", 1)
    await d.agent_reply(note, "#cc erin@users.test\n\nThe portal is back; please retry.")
    texts = await d.texts(d.helpbot, DANA, 2)
    assert "The portal is back" in texts[1]  # the chat gets it...
    [copy] = await d.mails_to("erin@users.test", 1)  # ...and so does the Cc, by mail
    assert hook in str(copy["Subject"])
    assert copy["From"].addresses[0].addr_spec == "help@helpdesk.test"
    assert "Alice" in copy["From"].addresses[0].display_name
    assert copy["Reply-To"] is None  # no agent token for a participant
    body = copy.get_body(("plain",))
    assert body is not None and "The portal is back; please retry." in body.get_content()
    assert "#cc" not in body.get_content()
    # Nobody is mailed at the chat's pseudo-address.
    assert all(not r.startswith("telegram:") for m in d.sink.messages for r in m.rcpt_tos)
    # Erin's answer threads on that mail and joins the ticket as a follow-up.
    answer = make_mail("Re: " + str(copy["Subject"]), "Works for me too, thanks.",
                       sender="Erin <erin@users.test>", in_reply_to=str(copy["Message-ID"]))
    code, text = await send(d.smtp_port, answer, mail_from="erin@users.test")
    assert code == 250 and "followup" in text, text
    [again] = d.tickets()
    assert again["articles"][-1]["sender"] == "erin@users.test"


async def test_webhook_checks_secret_and_ignores_redelivery(make_daemon: MakeDaemon) -> None:
    d = await make_daemon("webhook")
    assert d.app is not None
    url = f"http://127.0.0.1:{d.app.http.port}/telegram/helpbot"
    update = {"update_id": 1, "message": {"message_id": 1, "date": 0, "text": "forged",
                                          "chat": {"id": 666, "type": "private"},
                                          "from": {"id": 666, "is_bot": False,
                                                   "first_name": "Mallory"}}}
    assert await d.api.post_webhook(url, update, secret=None) == 403
    assert await d.api.post_webhook(url, update, secret="wrong") == 403
    assert await d.api.post_webhook(url, ["not", "an", "update"], secret=SECRET) == 400
    assert d.tickets() == []

    ticket = await _new_ticket(d)
    first = d.helpbot.webhook_deliveries[-1][0]
    # Telegram sends an update again when it missed our answer: stored once.
    d.helpbot.requeue(first)
    await d.until(lambda: [u for u, s in d.helpbot.webhook_deliveries if u == first] == [
        first, first] and not d.helpbot.pending, what="redelivery answered")
    [again] = d.tickets()
    assert again["number"] == ticket["number"] and len(again["articles"]) == 1
    assert d.quarantined() == 0  # recognised as a duplicate, not a failure


# -- files -------------------------------------------------------------------------------------


async def test_attachments_both_ways(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    bot = d.helpbot
    photo = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 20
    bot.message(DANA, caption="Screenshot of the error", photo=photo)
    await d.texts(bot, DANA, 1)
    [ticket] = d.tickets()
    assert ticket["subject"] == "Screenshot of the error"
    [att] = ticket["articles"][0]["attachments"]
    assert att["content_type"] == "image/jpeg" and att["size"] == len(photo)  # largest size

    # The agent's notification carries the picture itself.
    [note] = await d.mails_to("alice@agents.test", 1)
    [part] = list(note.iter_attachments())
    assert part.get_content_type() == "image/jpeg" and part.get_content() == photo

    # A document, and one over Telegram's 20 MB download limit (never fetched).
    log = b"2026-11-27 ERROR access denied\n" * 50
    bot.message(DANA, document=("app.log", "text/plain", log))
    await d.mails_to("alice@agents.test", 2)
    downloads = len(bot.calls("getFile"))
    bot.message(DANA, document=("disk.iso", "application/octet-stream", b"x"),
                declared_size=25 * 1024 * 1024)
    texts = await d.texts(bot, DANA, 2)
    assert "disk.iso" in texts[1] and "20 MB" in texts[1]
    assert len(bot.calls("getFile")) == downloads
    [ticket] = d.tickets()
    articles = ticket["articles"]
    assert [a["filename"] for a in articles[1]["attachments"]] == ["app.log"]
    assert "disk.iso" in articles[2]["body"] and "not received" in articles[2]["body"]

    # Agent -> chat: a picture goes as a photo, anything else as a document.
    png = b"\x89PNG\r\n\x1a\n" + bytes(200)
    pdf = b"%PDF-1.4\n" + bytes(300)
    await d.agent_reply(note, "Here is the fixed config and a screenshot.",
                        attachments=(("screen.png", "image/png", png),
                                     ("config.pdf", "application/pdf", pdf)))
    await d.until(lambda: len([s for s in bot.sent if s.data]) == 2, what="two files sent")
    files = {s.method: s for s in bot.sent if s.data}
    assert files["sendPhoto"].data == png
    assert files["sendDocument"].data == pdf and files["sendDocument"].filename == "config.pdf"
    assert "fixed config" in bot.texts(DANA)[-1]


# -- delivery trouble --------------------------------------------------------------------------


async def test_a_file_the_agent_sends_without_words_reaches_the_chat(
    make_daemon: MakeDaemon,
) -> None:
    d = await make_daemon()
    bot = d.helpbot
    await _new_ticket(d)
    [note] = await d.mails_to("alice@agents.test", 1)
    pdf = b"%PDF-1.4\n" + bytes(300)
    await d.agent_reply(note, "", attachments=(("config.pdf", "application/pdf", pdf),))
    await d.until(lambda: any(s.data for s in bot.sent), what="the file sent")
    [sent] = [s for s in bot.sent if s.data]
    assert (sent.method, sent.filename, sent.data) == ("sendDocument", "config.pdf", pdf)


async def test_long_reply_split_and_429_honoured(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    bot = d.helpbot
    await _new_ticket(d)
    [note] = await d.mails_to("alice@agents.test", 1)
    paragraphs = [f"Step {i}: " + "check the setting and note what it says. " * 2
                  for i in range(60)]
    long_text = "\n\n".join(paragraphs)
    assert len(long_text) > 4096
    # The first part goes through, the second is refused with flood control.
    bot.fail_next("sendMessage", 429, retry_after=30, after=1)
    await d.agent_reply(note, long_text)
    await d.until(lambda: any(c.status == 429 for c in bot.calls("sendMessage")),
                  what="the 429")
    await d.until(lambda: d.outbox()[-1].last_error is not None, what="the retry recorded")
    row = d.outbox()[-1]
    assert row.state == "pending" and row.attempts == 0  # rescheduled, not a failed attempt
    assert row.next_attempt_at == d.clock.now + dt.timedelta(seconds=30)
    assert len(bot.texts(DANA)) == 2  # ack + the first part

    d.clock.advance(seconds=31)
    assert d.app is not None and d.app.outbox is not None
    d.app.outbox.wake()
    texts = await d.texts(bot, DANA, 3)
    await d.until(lambda: d.outbox()[-1].state == "sent", what="relay row sent")
    parts = texts[1:]
    assert len(parts) == 2  # the first part was not sent twice
    assert all(len(p) <= 4096 for p in parts)
    assert parts[0].startswith("Step 0:") and "Step 59:" in parts[1]
    assert " ".join(" ".join(parts).split()).count("Step ") == 60


async def test_blocked_bot_becomes_internal_note(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    bot = d.helpbot
    await _new_ticket(d)
    [note] = await d.mails_to("alice@agents.test", 1)

    # Internal notes never reach the chat.
    await d.agent_reply(note, "#note\nChecked the logs: LDAP timeout.")
    await d.until(lambda: any(a["kind"] == "internal" for a in d.tickets()[0]["articles"]),
                  what="internal note stored")
    assert [r.kind for r in d.outbox()] == ["ack"]

    bot.block(DANA)
    await d.agent_reply(note, "Could you try again now?")
    await d.until(lambda: d.outbox()[-1].state == "dead", what="relay row dead")
    await d.until(lambda: any(e["kind"] == "delivery-failed" for e in d.tickets()[0]["events"]),
                  what="delivery failure recorded")
    [ticket] = d.tickets()
    note_article = ticket["articles"][-1]
    assert note_article["kind"] == "internal" and note_article["author_role"] == "system"
    assert "blocked the bot" in note_article["body"]
    assert "Could you try again now?" in note_article["body"]
    assert len(bot.texts(DANA)) == 1  # only the acknowledgement ever arrived
    assert d.outbox()[-1].attempts == 1  # 403 is permanent: no retries


# -- restart, bots, groups, edits --------------------------------------------------------------


async def test_restart_does_not_ingest_old_updates_again(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    bot = d.helpbot
    first = bot.message(DANA, "Cannot log in")
    await d.texts(bot, DANA, 1)
    await d.stop()
    # Stopping confirmed the committed offset to Telegram.
    assert bot.confirmed_offset == first["update_id"] + 1

    await d.start()
    # Even when Telegram hands an update out again (a crash before the offset moved on),
    # it is recognised by its update id.
    bot.requeue(first["update_id"])
    await d.until(lambda: bot.confirmed_offset == first["update_id"] + 1,
                  what="requeued update consumed")
    [ticket] = d.tickets()
    assert len(ticket["articles"]) == 1
    assert len(bot.texts(DANA)) == 1  # no second acknowledgement
    assert d.quarantined() == 0  # recognised as a duplicate, not a failure

    bot.message(DANA, "Still cannot log in")
    await d.mails_to("alice@agents.test", 2)
    [ticket] = d.tickets()
    assert [a["body"] for a in ticket["articles"]] == ["Cannot log in", "Still cannot log in"]


async def test_two_bots_route_to_their_own_groups(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    d.helpbot.message(DANA, "Please help asap, the VPN is down")
    d.catbot.message(DANA, "My service listing shows the wrong logo")
    d.helpbot.message(4242, "The catalogue page is wrong", first_name="Eve", username="eve")
    await d.texts(d.helpbot, DANA, 1)
    await d.texts(d.catbot, DANA, 1)
    await d.texts(d.helpbot, 4242, 1)
    tickets = {t["subject"]: t for t in d.tickets()}
    vpn = tickets["Please help asap, the VPN is down"]
    logo = tickets["My service listing shows the wrong logo"]
    catalogue = tickets["The catalogue page is wrong"]
    # A telegram-only rule set the priority; the bot's default group decided.
    assert (vpn["group"], vpn["priority"]) == ("First Line", "high")
    routed = next(e for e in vpn["events"] if e["kind"] == "routed")
    assert [t["rule"] for t in routed["data"]["trail"]] == ["telegram-asap"]
    assert (logo["group"], logo["priority"]) == ("Catalogue Support", "normal")
    assert logo["inbound_address"] == "catalogue@helpdesk.test"
    # The message text plays the subject for the demo's subject rule.
    assert catalogue["group"] == "Catalogue Support"
    # Same person on two bots: two front doors, two tickets.
    assert vpn["customer"] == logo["customer"] and vpn["number"] != logo["number"]
    # Bob (Catalogue Support) hears of both catalogue tickets, each from its bot's address.
    senders = {str(m["Subject"]): m["From"].addresses[0].addr_spec
               for m in await d.mails_to("bob@agents.test", 2)}
    assert {n: a for s, a in senders.items() for n in (logo["number"], catalogue["number"])
            if n in s} == {logo["number"]: "catalogue@helpdesk.test",
                           catalogue["number"]: "help@helpdesk.test"}
    assert not any(logo["number"] in str(m["Subject"])
                   for m in await d.mails_to("alice@agents.test", 1))


async def test_group_chat_refused_unless_allowed(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    d.helpbot.message(-100123, "Hello helpdesk", chat_type="group", user_id=777)
    [refusal] = await d.texts(d.helpbot, -100123, 1)
    assert "private" in refusal
    assert d.tickets() == []
    # catbot allows groups: the group chat is the customer.
    d.catbot.message(-100456, "Our group needs access", chat_type="supergroup",
                     chat_title="Lab 7", user_id=778)
    await d.texts(d.catbot, -100456, 1)
    [ticket] = d.tickets()
    assert ticket["customer"] == "telegram:-100456" and ticket["customer_name"] == "Lab 7"


async def test_edited_message_updates_article_and_records_edit(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    bot = d.helpbot
    first = bot.message(DANA, "Teh portal is down")
    await d.texts(bot, DANA, 1)
    bot.edit(first, "The portal is down since 9:00")
    await d.until(lambda: d.tickets()[0]["articles"][0]["body"] ==
                  "The portal is down since 9:00", what="article edited")
    [ticket] = d.tickets()
    assert len(ticket["articles"]) == 1
    [edit] = [e for e in ticket["events"] if e["kind"] == "article-edited"]
    assert edit["data"]["before"] == "Teh portal is down"
    assert edit["data"]["after"] == "The portal is down since 9:00"
    assert len(await d.mails_to("alice@agents.test", 1)) == 1  # an edit notifies nobody
    # A message with nothing to keep (a sticker, say) gets a hint, and no article.
    bot.message(DANA)
    hint = (await d.texts(bot, DANA, 2))[1]
    assert "only take text" in hint
    assert len(d.tickets()[0]["articles"]) == 1


# -- acknowledgement only after the commit -----------------------------------------------------


def _break_store(d: Daemon, tmp_path: Path) -> Callable[[], None]:
    """Point the intake at a store that cannot be written; returns the repair."""
    assert d.app is not None
    app = d.app
    (tmp_path / "blocker").write_text("not a directory")
    broken = create_engine(f"sqlite:///{tmp_path / 'blocker' / 'db.sqlite3'}")
    good = app.intake.sessions
    app.intake.sessions = make_sessionmaker(broken)

    def repair() -> None:
        app.intake.sessions = good
        broken.dispose()

    return repair


async def test_polling_offset_moves_only_after_commit(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    d = await make_daemon()
    assert d.app is not None
    bot = d.helpbot
    channel = next(c for c in d.app.channels if isinstance(c, TelegramChannel))
    failures: list[BaseException] = []
    submit = channel.submit

    async def recording(inbound: Any) -> Any:
        try:
            return await submit(inbound)
        except Exception as exc:
            failures.append(exc)
            raise

    channel.submit = recording
    repair = _break_store(d, tmp_path)
    update = bot.message(DANA, "Lost?")
    await d.until(lambda: failures, what="a failed commit")
    assert bot.confirmed_offset != update["update_id"] + 1
    assert bot.pending == [update]  # still Telegram's to deliver
    repair()
    # The same update is fetched again after a back-off and stored this time.
    await d.texts(bot, DANA, 1)
    [ticket] = d.tickets()
    assert [a["body"] for a in ticket["articles"]] == ["Lost?"]
    assert d.quarantined() == 0


async def test_webhook_answers_500_until_committed(
    make_daemon: MakeDaemon, tmp_path: Path
) -> None:
    d = await make_daemon("webhook")
    bot = d.helpbot
    repair = _break_store(d, tmp_path)
    update = bot.message(DANA, "Lost?")
    await d.until(lambda: bot.webhook_deliveries, what="a webhook delivery")
    assert bot.webhook_deliveries == [(update["update_id"], 500)]
    repair()
    d.api.redeliver(bot)  # Telegram tries again later
    await d.texts(bot, DANA, 1)
    assert bot.webhook_deliveries[-1] == (update["update_id"], 200)
    assert len(d.tickets()) == 1


# -- updates the poller must get past ---------------------------------------------------------


async def test_polling_gets_past_an_update_ptb_cannot_parse(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    bot = d.helpbot
    dana = {"id": DANA, "is_bot": False, "first_name": "Dana"}
    # PTB's Update.de_json needs a message's `date` and `chat`: parsing the batch with PTB
    # failed the whole getUpdates call, every time, and the poller stopped for good.
    bot.push({"message": {"message_id": 90, "chat": {"id": DANA, "type": "private"},
                          "from": dana, "text": "Sent without a date"}})
    no_chat = bot.push({"message": {"message_id": 91, "date": 0, "from": dana,
                                    "text": "No chat"}})
    last = bot.message(DANA, "A normal message after them")
    await d.until(lambda: d.quarantined() == 1 and len(d.tickets()) == 1
                  and len(d.tickets()[0]["articles"]) == 2, what="all three handled")
    # The update without a date is read as webhook mode reads it: a ticket.
    [ticket] = d.tickets()
    assert [a["body"] for a in ticket["articles"]] == ["Sent without a date",
                                                       "A normal message after them"]
    # The one the chat path cannot read either is quarantined with its reason, as raw.
    assert d.app is not None
    with d.app.sessions() as s:
        [row] = list(s.scalars(select(QuarantineRow)))
        assert (row.stage, row.reason) == ("parse", "bad-update")
        assert row.channel_message_id == f"helpbot:{no_chat['update_id']}"
        assert b'"No chat"' in row.raw
    # ...and the offset moved past all three.
    await d.until(lambda: bot.confirmed_offset == last["update_id"] + 1, what="offset confirmed")


async def test_a_lone_surrogate_does_not_block_the_bot(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    bot = d.helpbot
    # Half an emoji (JSON "\ud83d" without its pair): strict UTF-8 refused it before the
    # submit, and the poller fetched the same update again, for ever.
    broken = bot.message(DANA, "broken emoji \ud83d here")
    bot.message(DANA, "A normal message after it")
    await d.mails_to("alice@agents.test", 2)
    [ticket] = d.tickets()
    # Stored with U+FFFD in place of the lone half; the raw record keeps it as it came.
    assert [a["body"] for a in ticket["articles"]] == ["broken emoji \ufffd here",
                                                       "A normal message after it"]
    assert d.app is not None
    with d.app.sessions() as s:
        article = s.get(Article, ticket["articles"][0]["id"])
        assert article is not None and article.raw is not None
        raw = article.raw
    assert json.loads(raw)["update"] == broken
    assert d.quarantined() == 0


async def test_an_update_that_cannot_be_prepared_is_quarantined_not_retried(
    make_daemon: MakeDaemon,
) -> None:
    d = await make_daemon()
    bot = d.helpbot
    # A document without a file_id fails before the submit, the same way every time.
    bad = bot.push({"message": {"message_id": 92, "date": 0,
                                "chat": {"id": DANA, "type": "private"},
                                "from": {"id": DANA, "is_bot": False, "first_name": "Dana"},
                                "document": {"file_unique_id": "U1", "file_name": "a.pdf"}}})
    last = bot.message(DANA, "A normal message after it")
    await d.texts(bot, DANA, 1)
    assert d.app is not None
    with d.app.sessions() as s:
        [row] = list(s.scalars(select(QuarantineRow)))
        assert (row.stage, row.reason) == ("prepare", "not-prepared")
        assert "KeyError" in row.detail and "file_id" in row.detail
        assert row.channel_message_id == f"helpbot:{bad['update_id']}"
        assert json.loads(row.raw)["update"] == bad
    await d.until(lambda: bot.confirmed_offset == last["update_id"] + 1, what="offset confirmed")
    assert [a["body"] for a in d.tickets()[0]["articles"]] == ["A normal message after it"]


async def test_a_command_for_another_bot_in_the_group_is_not_ours(
    make_daemon: MakeDaemon,
) -> None:
    d = await make_daemon()
    cat = d.catbot
    group = {"chat_type": "supergroup", "chat_title": "Lab 7", "user_id": 778}
    cat.message(-100456, "Our group needs access", **group)
    await d.texts(cat, -100456, 1)
    # Addressed to another bot: not run, not stored, not answered.
    cat.message(-100456, "/close@some_other_bot", **group)
    # Addressed to ours (the username in any case): run.
    cat.message(-100456, "/status@CatBot", **group)
    status = (await d.texts(cat, -100456, 2))[1]
    [ticket] = d.tickets()
    assert ticket["state"] == "new" and f"[Ticket#{ticket['number']}]" in status
    assert len(ticket["articles"]) == 1
    cat.message(-100456, "/close@catbot", **group)
    await d.texts(cat, -100456, 3)
    assert d.tickets()[0]["state"] == "closed"


async def test_a_downloaded_file_is_encoded_off_the_event_loop(
    make_daemon: MakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.channels.telegram as telegram_module

    encoded_in: list[int] = []
    real = telegram_module.encode_raw

    def recording(*args: Any, **kwargs: Any) -> bytes:
        encoded_in.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(telegram_module, "encode_raw", recording)
    d = await make_daemon()
    d.helpbot.message(DANA, document=("app.log", "text/plain", b"ERROR\n" * 1000))
    await d.texts(d.helpbot, DANA, 1)
    # base64 + JSON of a file up to 20 MB blocked the loop for up to ~0.2 s.
    assert encoded_in and threading.get_ident() not in encoded_in


async def test_a_round_video_message_is_stored(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    bot = d.helpbot
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(500)
    ref = bot.add_file(video, "video_notes/file")
    bot.push({"message": {"message_id": 50, "date": 0, "chat": {"id": DANA, "type": "private"},
                          "from": {"id": DANA, "is_bot": False, "first_name": "Dana"},
                          "video_note": {**ref, "length": 240, "duration": 5}}})
    [ack] = await d.texts(bot, DANA, 1)
    assert "only take text" not in ack  # was refused as "nothing to keep"
    [ticket] = d.tickets()
    [att] = ticket["articles"][0]["attachments"]
    assert att["content_type"] == "video/mp4" and att["size"] == len(video)
    assert att["filename"].endswith(".mp4")


async def test_a_reply_follows_a_group_upgraded_to_a_supergroup(make_daemon: MakeDaemon) -> None:
    d = await make_daemon()
    cat = d.catbot
    group, supergroup = -100456, -1009999
    cat.message(group, "Our group needs access", chat_type="group", chat_title="Lab 7",
                user_id=778)
    await d.texts(cat, group, 1)
    [note] = await d.mails_to("bob@agents.test", 1)
    cat.migrate(group, supergroup)  # Telegram now answers 400 + migrate_to_chat_id
    await d.agent_reply(note, "Access granted, please retry.", agent="bob@agents.test")
    [reply] = await d.texts(cat, supergroup, 1)
    assert "Access granted" in reply
    await d.until(lambda: d.outbox()[-1].state == "sent", what="relay row sent")
    [ticket] = d.tickets()
    assert ticket["customer"] == f"telegram:{supergroup}"
    [moved] = [e for e in ticket["events"] if e["kind"] == "chat-migrated"]
    assert (moved["data"]["from"], moved["data"]["to"]) == (group, supergroup)
    # The supergroup's next message follows up the same ticket.
    cat.message(supergroup, "Works now", chat_type="supergroup", chat_title="Lab 7",
                user_id=778)
    await d.mails_to("bob@agents.test", 2)
    [ticket] = d.tickets()
    assert ticket["articles"][-1]["body"] == "Works now"


async def test_an_edit_keeps_the_file_notes_and_drops_the_new_command(
    make_daemon: MakeDaemon,
) -> None:
    d = await make_daemon()
    bot = d.helpbot
    iso = bot.message(DANA, caption="the ISO", declared_size=25 * 1024 * 1024,
                      document=("disk.iso", "application/octet-stream", b"x"))
    await d.texts(bot, DANA, 2)
    [before] = [a["body"] for a in d.tickets()[0]["articles"]]
    assert before.startswith("the ISO\n\n[disk.iso (25.0 MB) not received")
    msg = {**iso["message"], "caption": "the ISO image", "edit_date": 1}
    bot.push({"edited_message": msg})
    await d.until(lambda: d.tickets()[0]["articles"][0]["body"] != before, what="edited")
    assert d.tickets()[0]["articles"][0]["body"] == before.replace("the ISO", "the ISO image")

    printer = bot.message(DANA, "/new Printer broken")
    await d.texts(bot, DANA, 3)
    assert d.tickets()[-1]["articles"][0]["body"] == "Printer broken"
    bot.edit(printer, "/new Printer broken on floor 2")
    await d.until(lambda: any(e["kind"] == "article-edited" for e in d.tickets()[-1]["events"]),
                  what="edited")
    assert d.tickets()[-1]["articles"][0]["body"] == "Printer broken on floor 2"
