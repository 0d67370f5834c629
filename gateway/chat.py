"""The chat path of the pipeline: one Telegram update -> ticket changes and bot replies.

`Pipeline.ingest` hands every Telegram `Inbound` here. The adapter has already
downloaded the update's files, so this path is network-free like the mail path
and runs in the same transaction; everything the bot answers is an outbox row
(channel "telegram") committed together with the ticket change that caused it.

`Inbound.raw` is the JSON that `encode_raw` writes: the bot's configured name,
the Bot API `Update` exactly as received, the downloaded files (base64) and the
files that were too large to fetch. Quarantine keeps it whole, so `quarantine
retry` needs no network either.

A chat is the customer (`telegram:<chat id>`); its tickets are those of that
chat on that bot. Plain messages go to the chat's latest open ticket, or open
one; `/new` always opens one. Routing rules see the message text as subject and
body, and `telegram` as the channel; a new ticket without a matching rule goes
to the bot's default group.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.config import TelegramSettings
from gateway.mail.auto import AutoInfo
from gateway.message import Address, Attachment, Inbound, ParsedMail
from gateway.pipeline import (
    Disposition,
    Outcome,
    Pipeline,
    StageError,
    open_ticket,
    routed_data,
    stage,
)
from gateway.routing import Decision, RoutingFacts
from gateway.store.models import Article, MessageId, Participant, Ticket
from gateway.store.pending import add_event, add_message_id, add_row

if TYPE_CHECKING:
    from gateway.notify import Notifier
    from gateway.outbox import Delivery

log = logging.getLogger(__name__)

RAW_VERSION = 1
CHANNEL = "telegram"
# A person wrote it: chat messages are never automatic mail (B17 does not apply).
_PERSON = AutoInfo(False, (), False)
_SUBJECT_MAX = 100
_OPEN_STATES = ("new", "open", "pending")
# Surrogate code points left in a decoded str are lone halves (json.loads joins the pairs):
# Telegram passes on what a client sent, e.g. half of an emoji cut by a buggy client.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# The note `_ChatPath._body` writes for a file that was too large to fetch.
_SKIPPED_NOTE = re.compile(r"\[[^\n]* \(\d+\.\d MB\) not received: larger than \d+ MB\]")


class NotPrepared(ValueError):
    """The adapter could not prepare the update (its files, its encoding): `encode_failed`."""


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A file the adapter did not download (over Telegram's download limit)."""

    kind: str
    filename: str
    size: int


@dataclass(frozen=True, slots=True)
class ChatUpdate:
    """The parts of a Bot API update the chat path acts on."""

    bot: str
    update_id: int
    kind: str  # "message", "edited_message" or the update's other type
    update: dict[str, Any]
    chat_id: int | None = None
    chat_type: str = ""
    chat_title: str = ""
    user_id: int | None = None
    user_name: str = ""
    username: str = ""
    user_is_bot: bool = False
    message_id: int | None = None
    text: str = ""
    date: dt.datetime | None = None
    files: tuple[Attachment, ...] = ()
    skipped: tuple[SkippedFile, ...] = ()
    # This bot's Telegram username (getMe), "" where unknown (raws from before it was kept).
    bot_username: str = ""

    def _command_parts(self) -> tuple[str, str, str] | None:
        """(`name`, `addressee`, `argument`) for `/name@addressee argument`, else None."""
        if not self.text.startswith("/"):
            return None
        head, _, arg = self.text.partition(" ")
        if "\n" in head:
            head, _, rest = head.partition("\n")
            arg = f"{rest} {arg}".strip()
        name, _, addressee = head[1:].partition("@")
        name = name.lower()
        if not name or not name.replace("_", "").isalnum():
            return None
        return name, addressee, arg.strip()

    @property
    def for_another_bot(self) -> bool:
        """A command addressed to some other bot (`/close@other_bot`).

        Telegram's bot docs ("Commands"): in a chat with several bots, a command carries
        the username of the bot it is for. Usernames compare case-insensitively.
        """
        parts = self._command_parts()
        return (parts is not None and bool(parts[1]) and bool(self.bot_username)
                and parts[1].lower() != self.bot_username.lower())

    @property
    def command(self) -> tuple[str, str] | None:
        """(`name`, `argument`) for `/name argument` or `/name@thisbot argument`, else None."""
        parts = self._command_parts()
        if parts is None or self.for_another_bot:
            return None
        return parts[0], parts[2]

    @property
    def private(self) -> bool:
        return self.chat_type == "private"


# -- the raw format, shared with the adapter -----------------------------------------


def encode_raw(
    bot: str,
    update: dict[str, Any],
    files: Sequence[tuple[str, Attachment]] = (),
    skipped: Sequence[SkippedFile] = (),
    username: str = "",
) -> bytes:
    """What the adapter submits as `Inbound.raw`: the update plus its fetched files.

    `username` is the bot's Telegram username, to tell its commands from other bots'.
    """
    return json_bytes({
        "v": RAW_VERSION,
        "bot": bot,
        "me": username,
        "update": update,
        "files": [{"kind": kind, "filename": a.filename, "content_type": a.content_type,
                   "data": base64.b64encode(a.data).decode("ascii")} for kind, a in files],
        "skipped": [dataclasses.asdict(s) for s in skipped],
    })


def encode_failed(bot: str, update: dict[str, Any], error: str) -> bytes:
    """`Inbound.raw` for an update the adapter could not prepare: the chat path quarantines it.

    A failure before submit that is not the network's (a malformed file entry, a bug)
    would fail the same way on every retry and hold up every later update of the bot;
    in quarantine the update is kept and the bot moves on.
    """
    return json_bytes({"v": RAW_VERSION, "bot": bot, "update": update, "error": error})


def json_bytes(value: Any) -> bytes:
    """`value` as UTF-8 JSON; cannot fail on what json.loads produced.

    A lone UTF-16 surrogate (JSON "\\ud83d" without its pair) is a str that strict
    UTF-8 refuses. Such a value is written with every non-ASCII character escaped
    instead: still valid UTF-8 JSON, and lossless (json.loads gives back the same
    str), where errors="surrogatepass" would write bytes that are not UTF-8 and
    errors="replace" would lose the character from the raw record.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _clean(value: Any) -> str:
    """A str from the update, safe to store: lone surrogates become U+FFFD.

    The raw update keeps the original; the database drivers refuse lone surrogates.
    """
    return _LONE_SURROGATE.sub("\ufffd", str(value))


def parse_raw(raw: bytes) -> ChatUpdate:
    """`Inbound.raw` -> ChatUpdate; ValueError/KeyError/TypeError on anything malformed."""
    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("v") != RAW_VERSION:
        raise ValueError("not a helpdeskd Telegram update (unknown format version)")
    if "error" in data:
        raise NotPrepared(_clean(data["error"]))
    bot = str(data["bot"])
    update = data["update"]
    update_id = int(update["update_id"])
    kind = next((k for k in update if k != "update_id"), "")
    if kind not in ("message", "edited_message"):
        return ChatUpdate(bot, update_id, kind, update)
    msg = update[kind]
    chat = msg["chat"]
    user = msg.get("from") or {}
    name = _clean(" ".join(p for p in (user.get("first_name", ""), user.get("last_name", ""))
                           if p))
    files = tuple(
        Attachment(_clean(f["filename"]), str(f["content_type"]),
                   base64.b64decode(f["data"], validate=True))
        for f in data.get("files", [])
    )
    skipped = tuple(SkippedFile(str(s["kind"]), _clean(s["filename"]), int(s["size"]))
                    for s in data.get("skipped", []))
    return ChatUpdate(
        bot=bot,
        update_id=update_id,
        kind=kind,
        update=update,
        chat_id=int(chat["id"]),
        chat_type=str(chat.get("type", "")),
        chat_title=_clean(chat.get("title") or ""),
        user_id=int(user["id"]) if "id" in user else None,
        user_name=name or _clean(chat.get("title") or ""),
        username=_clean(user.get("username") or ""),
        user_is_bot=bool(user.get("is_bot")),
        message_id=int(msg["message_id"]),
        text=_clean(msg.get("text") or msg.get("caption") or ""),
        date=dt.datetime.fromtimestamp(int(msg["date"]), dt.UTC) if "date" in msg else None,
        files=files,
        skipped=skipped,
        bot_username=str(data.get("me") or ""),
    )


def update_key(bot: str, update_id: int) -> str:
    """Dedup key of an update (a MessageId row): Telegram may deliver one twice."""
    return f"tg:{bot}:update:{update_id}"


def message_key(bot: str, chat_id: int, message_id: int) -> str:
    """An article's `message_id`: message ids are unique per chat, so the chat is part of it."""
    return f"tg:{bot}:{chat_id}:{message_id}"


def customer_key(chat_id: int) -> str:
    return f"telegram:{chat_id}"


# -- entry point -----------------------------------------------------------------------


def ingest(pipeline: Pipeline, session: Session, inbound: Inbound, now: dt.datetime) -> Disposition:
    """Ingest one Telegram update inside the caller's transaction."""
    with stage("parse"):
        try:
            upd = parse_raw(inbound.raw)
        except NotPrepared as exc:
            raise StageError("prepare", "not-prepared", str(exc)) from exc
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise StageError("parse", "bad-update", f"{type(exc).__name__}: {exc}") from exc
        bot = pipeline.settings.telegram_bot(upd.bot)
        if bot is None:
            raise StageError("parse", "unknown-bot",
                             f"update for bot {upd.bot!r}, which is not configured")
    key = update_key(upd.bot, upd.update_id)
    with stage("dedup"):
        if session.get(MessageId, key) is not None:
            log.info("telegram %s: update %d is a duplicate, discarded", upd.bot, upd.update_id)
            return Disposition(Outcome.DUPLICATE, message_id=key)
    path = _ChatPath(pipeline, session, inbound, upd, bot, now)
    result = path.run()
    # The update id is recorded whatever happened to it, so a redelivery is a duplicate.
    add_message_id(session, key, path.ticket,
                   "in" if path.ticket is not None else "dropped", now)
    return dataclasses.replace(result, message_id=key)


class _ChatPath:
    """One update's way through the chat path (short-lived: one per update)."""

    def __init__(self, pipeline: Pipeline, session: Session, inbound: Inbound,
                 upd: ChatUpdate, bot: TelegramSettings, now: dt.datetime) -> None:
        self.p = pipeline
        self.notifier = pipeline.notifier
        self.session = session
        self.inbound = inbound
        self.upd = upd
        self.bot = bot
        self.now = now
        self.ticket: Ticket | None = None  # the ticket the update went to
        self.tag = f"telegram {bot.name}: update {upd.update_id}"

    def run(self) -> Disposition:
        u = self.upd
        if u.kind == "edited_message":
            with stage("edit"):
                return self._edited()
        if u.kind != "message" or u.chat_id is None:
            log.info("%s: %s update ignored", self.tag, u.kind or "empty")
            return Disposition(Outcome.IGNORED, reason=f"update type {u.kind or '-'}")
        if u.user_is_bot:
            return Disposition(Outcome.IGNORED, reason="message from a bot")
        if u.for_another_bot:
            # Meant for another bot in the chat: neither ours to run nor a message to us.
            log.info("%s: command for another bot ignored", self.tag)
            return Disposition(Outcome.IGNORED, reason="command for another bot")
        if not u.private and not self.bot.allow_groups:
            with stage("persist"):
                self._say(None, "refusal", "telegram_group_refused.txt", automatic=True)
            log.info("%s: %s chat %d refused", self.tag, u.chat_type, u.chat_id)
            return Disposition(Outcome.DROPPED, reason="group chat")
        cmd = u.command
        if cmd is not None:
            with stage("command"):
                return self._command(*cmd)
        if not u.text.strip() and not u.files and not u.skipped:
            # A sticker, a location, a poll: nothing an agent could work with.
            with stage("persist"):
                self._say(None, "bot", "telegram_help.txt", automatic=True,
                          hint="Sorry, I can only take text, photos, documents, voice "
                               "messages and videos.")
            return Disposition(Outcome.IGNORED, reason="nothing to keep")
        return self._message(u.text, new=False)

    # -- customer messages -------------------------------------------------------------

    def _message(self, text: str, *, new: bool) -> Disposition:
        u = self.upd
        with stage("routing"):
            decision = self.p.rules.current.evaluate(self._facts(text))
            if decision.drop:
                log.info("%s: dropped by rule %s", self.tag, decision.drop_rule)
                return Disposition(Outcome.DROPPED, reason=decision.drop_rule or "")
        with stage("persist"):
            ticket = None if new else self._latest_open()
            mail = self._as_mail(text)
            if ticket is None:
                ticket = self._create(mail, decision)
                outcome = Outcome.CREATED
            else:
                self._followup(ticket, mail)
                outcome = Outcome.FOLLOWUP
            if u.skipped:
                self._say(ticket, "notice", "telegram_too_large.txt", automatic=True,
                          files=[s.filename for s in u.skipped],
                          limit_mb=self.bot.max_download_bytes // (1024 * 1024),
                          address=ticket.inbound_address,
                          hook=self.p.hooks.format(ticket.number))
        self.ticket = ticket
        return Disposition(outcome, ticket.number)

    def _create(self, mail: ParsedMail, decision: Decision) -> Ticket:
        u = self.upd
        assert u.chat_id is not None and mail.sender is not None
        group = decision.group or self.bot.default_group
        if group is None:
            inbound = self.p.settings.inbound_for(self.bot.inbound_address)
            group = inbound.default_group if inbound else self.p.settings.groups[0].name
        ticket = open_ticket(
            self.session, self.now, decision, subject=mail.subject, group=group,
            customer=customer_key(u.chat_id),
            customer_name=u.user_name if u.private else (u.chat_title or u.user_name),
            channel=CHANNEL, inbound_address=self.bot.inbound_address,
            channel_ref={"bot": self.bot.name, "chat_id": u.chat_id, "chat_type": u.chat_type,
                         "user_id": u.user_id, "username": u.username},
        )
        add_row(self.session, Participant, ticket, {
            "address": ticket.customer, "name": ticket.customer_name, "role": "customer"})
        article = self._store(ticket, mail)
        add_event(self.session, ticket, at=self.now, actor=ticket.customer, kind="created",
                  data={"message_id": mail.message_id, "channel": CHANNEL,
                        "inbound": ticket.inbound_address, "bot": self.bot.name,
                        "chat_id": u.chat_id, "automatic": [], "linked": None})
        add_event(self.session, ticket, at=self.now, actor="routing", kind="routed",
                  data=routed_data(ticket, decision))
        self.p.changed(self.session, ticket, "created", self.now)
        self._say(ticket, "ack", "telegram_ack.txt", automatic=True,
                  hook=self.p.hooks.format(ticket.number), group=ticket.group)
        self.notifier.notify_agents(self.session, ticket, article, "agent_new.txt", self.now,
                                    attach=True)
        log.info("%s: new ticket %s in %s", self.tag, ticket.number, group)
        return ticket

    def _followup(self, ticket: Ticket, mail: ParsedMail) -> None:
        article = self._store(ticket, mail)
        ticket.updated_at = self.now
        if ticket.state == "pending":
            # B10: a customer follow-up reopens a pending ticket (closed ones are not
            # followed up in a chat: the next message opens a new ticket).
            add_event(self.session, ticket, at=self.now, actor=ticket.customer,
                      kind="state", data={"from": "pending", "to": "open",
                                          "why": "customer follow-up"})
            ticket.state = "open"
            self.p.changed(self.session, ticket, "state", self.now)
        self.p.changed(self.session, ticket, "customer-message", self.now)
        self.notifier.notify_agents(self.session, ticket, article, "agent_followup.txt",
                                    self.now, attach=True)
        log.info("%s: follow-up on ticket %s", self.tag, ticket.number)

    def _store(self, ticket: Ticket, mail: ParsedMail) -> Article:
        # The article keeps the update itself; its files are stored once, as blobs.
        raw = json_bytes({"bot": self.bot.name, "update": self.upd.update})
        inbound = dataclasses.replace(self.inbound, raw=raw)
        return self.p._store_article(self.session, ticket, inbound, mail, _PERSON, self.now,
                                     kind="public", role="customer")

    # -- edits -------------------------------------------------------------------------

    def _edited(self) -> Disposition:
        u = self.upd
        assert u.chat_id is not None and u.message_id is not None
        key = message_key(self.bot.name, u.chat_id, u.message_id)
        article = self.session.scalars(
            select(Article).where(Article.message_id == key).order_by(Article.id).limit(1)
        ).first()
        if article is None:
            log.info("%s: edit of message %s, which is no article, ignored", self.tag, key)
            return Disposition(Outcome.IGNORED, reason="edit of an unknown message")
        ticket = article.ticket
        before = article.body
        text = u.text
        cmd = u.command
        if cmd is not None and cmd[0] == "new":
            text = cmd[1]  # stored without the command, as when the message came
        # An edit carries no files (only the caption changes): the notes of files that
        # were not received stay.
        notes = [p for p in before.split("\n\n") if _SKIPPED_NOTE.fullmatch(p)]
        article.body = "\n\n".join([p for p in (text, *notes) if p])
        edit_date = u.update["edited_message"].get("edit_date")
        add_event(self.session, ticket, at=self.now, actor=ticket.customer,
                  kind="article-edited",
                  data={"article": article.id, "message_id": key,
                        "before": before, "after": article.body,
                        "edit_date": edit_date})
        ticket.updated_at = self.now
        self.ticket = ticket
        log.info("%s: message %s on ticket %s edited", self.tag, key, ticket.number)
        return Disposition(Outcome.FOLLOWUP, ticket.number, reason="edited")

    # -- commands ----------------------------------------------------------------------

    def _command(self, name: str, arg: str) -> Disposition:
        u = self.upd
        if name == "new":
            if arg or u.files or u.skipped:
                return self._message(arg, new=True)
            self._say(None, "bot", "telegram_help.txt", automatic=False,
                      hint="Write your question after /new, e.g. /new I cannot log in.")
        elif name == "start":
            self._say(None, "bot", "telegram_welcome.txt", automatic=False,
                      customer_name=u.user_name)
        elif name == "status":
            tickets = [{"hook": self.p.hooks.format(t.number), "subject": t.subject,
                        "state": t.state} for t in self._open_tickets()]
            self._say(None, "bot", "telegram_status.txt", automatic=False, tickets=tickets)
        elif name == "close":
            return self._close()
        else:
            hint = "" if name == "help" else f"Sorry, I do not know the command /{name}."
            self._say(None, "bot", "telegram_help.txt", automatic=False, hint=hint)
        log.info("%s: /%s answered", self.tag, name)
        return Disposition(Outcome.COMMAND, reason=f"/{name}")

    def _close(self) -> Disposition:
        ticket = self._latest_open()
        if ticket is None:
            self._say(None, "bot", "telegram_closed.txt", automatic=False, ticket=None, hook="")
            return Disposition(Outcome.COMMAND, reason="/close")
        add_event(self.session, ticket, at=self.now, actor=ticket.customer, kind="state",
                  data={"from": ticket.state, "to": "closed",
                        "why": "customer /close"})
        ticket.state = "closed"
        ticket.closed_at = self.now
        ticket.updated_at = self.now
        self.p.changed(self.session, ticket, "state", self.now)
        self._say(ticket, "bot", "telegram_closed.txt", automatic=False, ticket=ticket,
                  hook=self.p.hooks.format(ticket.number))
        self.ticket = ticket
        log.info("%s: ticket %s closed by the customer", self.tag, ticket.number)
        return Disposition(Outcome.COMMAND, ticket.number, reason="/close")

    # -- helpers -----------------------------------------------------------------------

    def _open_tickets(self) -> list[Ticket]:
        """This chat's open tickets on this bot, newest first."""
        assert self.upd.chat_id is not None
        candidates = self.session.scalars(
            select(Ticket).where(Ticket.channel == CHANNEL,
                                 Ticket.customer == customer_key(self.upd.chat_id),
                                 Ticket.state.in_(_OPEN_STATES))
            .order_by(Ticket.id.desc())
        )
        # The same person is the same chat id on every bot; each bot is its own front door.
        return [t for t in candidates if (t.channel_ref or {}).get("bot") == self.bot.name]

    def _latest_open(self) -> Ticket | None:
        tickets = self._open_tickets()
        return tickets[0] if tickets else None

    def _facts(self, text: str) -> RoutingFacts:
        u = self.upd
        return RoutingFacts(
            # "The first message's text plays the subject": all of it, on one line (B3).
            subject=" ".join(text.split()) or _subject(text, u.files),
            sender=customer_key(u.chat_id or 0),
            to=(), cc=(), body=text, headers=(), channel=CHANNEL,
            inbound=self.bot.inbound_address,
        )

    def _body(self, text: str) -> str:
        # Keep `_SKIPPED_NOTE` matching what is written here (edits find the notes by it).
        notes = [f"[{s.filename} ({s.size / (1024 * 1024):.1f} MB) not received: larger than "
                 f"{self.bot.max_download_bytes // (1024 * 1024)} MB]" for s in self.upd.skipped]
        return "\n\n".join([p for p in (text, *notes) if p])

    def _as_mail(self, text: str) -> ParsedMail:
        """The message in the shape the pipeline's article helper stores."""
        u = self.upd
        assert u.chat_id is not None and u.message_id is not None
        sender = f"telegram:{u.user_id if u.user_id is not None else u.chat_id}"
        return ParsedMail(
            subject=_subject(text, u.files), sender=Address(sender, u.user_name),
            to=(), cc=(), reply_to=(), date=u.date,
            message_id=message_key(self.bot.name, u.chat_id, u.message_id),
            in_reply_to=(), references=(), text=self._body(text), html=None,
            attachments=u.files, headers=(),
        )

    def _say(self, about: Ticket | None, kind: str, template: str, *, automatic: bool,
             **context: Any) -> None:
        """A bot answer to this chat (about a ticket or not), as an outbox row here."""
        assert self.upd.chat_id is not None
        text = self.notifier.templates.render(template, helpdesk=self.notifier.helpdesk,
                                              **context)
        self.notifier.enqueue_chat(self.session, about, kind, bot=self.bot.name,
                                   chat_id=self.upd.chat_id, text=text.strip(),
                                   automatic=automatic, now=self.now)


def _subject(text: str, files: Sequence[Attachment]) -> str:
    """A ticket subject from a chat message: its first line, shortened."""
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            return line if len(line) <= _SUBJECT_MAX else line[: _SUBJECT_MAX - 1] + "…"
    if files:
        return "(" + ", ".join(f.filename for f in files) + ")"
    return "(no text)"


# -- delivery failures -----------------------------------------------------------------


def delivery_failed(notifier: Notifier, session: Session, item: Delivery, error: str,
                    now: dt.datetime) -> None:
    """A chat message is dead: record an internal note on its ticket (never sent to the chat)."""
    ticket = session.get(Ticket, item.ticket_id) if item.ticket_id is not None else None
    if ticket is None:
        log.warning("telegram: undeliverable %s message (outbox %d) to %s: %s",
                    item.kind, item.id, item.recipients[0] if item.recipients else "-", error)
        return
    payload = item.payload or {}
    blocked = "forbidden" in error.lower()
    body = notifier.templates.render(
        "telegram_undeliverable.txt", error=error, blocked=blocked,
        text=str(payload.get("text", "")),
    )
    session.add(Article(
        ticket=ticket, kind="internal", direction="out", channel=CHANNEL, sender="helpdeskd",
        sender_name=notifier.helpdesk, author_role="system", to=list(item.recipients), cc=[],
        subject="Undeliverable chat message", body=body, html=None, message_id=None,
        automatic=True, raw=None, created_at=now,
    ))
    add_event(session, ticket, at=now, actor="system", kind="delivery-failed",
              data={"outbox": item.id, "kind": item.kind, "channel": item.channel,
                    "error": error, "blocked": blocked})
    log.warning("ticket %s: %s message (outbox %d) to the chat is dead: %s",
                ticket.number, item.kind, item.id, error)
