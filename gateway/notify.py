"""Who is told what: templates -> Outbound -> outbox rows, inside the caller's transaction.

Every message the daemon writes is composed here and stored as an outbox row in
the same transaction as the ticket change that caused it, together with its
Message-ID (so replies to it thread back, B8). Mail the daemon writes by itself
(acknowledgements, error mails) is capped per address and hour; a person's words
(a relayed agent reply) never are.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import jinja2
from sqlalchemy import Table, bindparam, func, select
from sqlalchemy.orm import Session

from gateway.config import Settings
from gateway.followup import Hooks, make_token, reply_address
from gateway.mail.compose import ComposeError, compose, encode_address, make_message_id
from gateway.message import Address, Outbound
from gateway.store.models import Article, OutboxRow, Ticket
from gateway.store.pending import Pending, add_event, add_message_id, add_row, pending_of

log = logging.getLogger(__name__)

PACKAGE_TEMPLATES = Path(__file__).resolve().parent / "templates"

# Built once, in Core (it runs for every automatic mail): building the statement and its
# cache key each time cost several times what SQLite takes to count.
_outbox = cast(Table, OutboxRow.__table__)
_AUTOMATIC_SINCE = (_outbox.c.automatic.is_(True), _outbox.c.created_at > bindparam("since"))
# One address (outside the intake's fast path), or a batch's senders at once.
_AUTO_MAIL_COUNT = select(func.count(_outbox.c.id)).where(
    _outbox.c.to_address == bindparam("address"), *_AUTOMATIC_SINCE)
_AUTO_MAIL_COUNTS = select(_outbox.c.to_address, func.count(_outbox.c.id)).where(
    _outbox.c.to_address.in_(bindparam("addresses", expanding=True)), *_AUTOMATIC_SINCE,
).group_by(_outbox.c.to_address)


class Templates:
    """Jinja2 templates: a configured override directory first, then the shipped ones.

    Each template is read once (SIGHUP re-reads them, with the rules): checking the
    file's mtime at every render cost a stat() per outbound message.
    """

    def __init__(self, override: Path | None = None) -> None:
        paths = [str(override)] if override is not None else []
        paths.append(str(PACKAGE_TEMPLATES))
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(paths),
            # HTML templates escape everything they interpolate; text templates stay plain.
            autoescape=jinja2.select_autoescape(["html", "htm"], default=False),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            auto_reload=False,
        )

    def reload(self) -> None:
        """Read every template again at its next use (SIGHUP)."""
        if self.env.cache is not None:
            self.env.cache.clear()

    def render(self, name: str, **context: Any) -> str:
        return self.env.get_template(name).render(**context)


class Notifier:
    """Builds the daemon's messages and writes them to the outbox."""

    def __init__(self, settings: Settings, templates: Templates, hooks: Hooks) -> None:
        self.settings = settings
        self.templates = templates
        self.hooks = hooks
        self.secret = settings.daemon.secret.get_secret_value().encode()
        self.domain = settings.daemon.message_id_domain
        self.loop_value = f"helpdeskd@{self.domain}"
        self.helpdesk = settings.daemon.name
        self._own = frozenset(i.address for i in settings.inbound)
        # The time zone a group works in (its business-hours calendar's); the App wires
        # the SLA engine's answer in. Times shown to agents and read from them use it.
        self.zone_for: Callable[[str], dt.tzinfo] = lambda _group: dt.UTC

    def local_time(self, group: str, instant: dt.datetime) -> str:
        """An instant as the group's agents read it, e.g. "2026-12-01 09:00 CET"."""
        return instant.astimezone(self.zone_for(group)).strftime("%Y-%m-%d %H:%M %Z")

    # -- helpers -------------------------------------------------------------------

    def is_own(self, address: str) -> bool:
        """True for the daemon's own addresses (and their sub-addresses): never mailed."""
        return self.settings.inbound_for(address) is not None

    def _deliverable(self, address: str, ticket: Ticket | None) -> bool:
        """Not one of ours (B19) and encodable: one bad Cc must not sink the message."""
        if self.is_own(address):
            return False
        try:
            encode_address(address)
        except ComposeError:
            log.warning("ticket %s: skipping unusable address %r", _num(ticket), address)
            return False
        return True

    def _sender(self, ticket: Ticket, display: str | None = None) -> Address:
        inbound = self.settings.inbound_for(ticket.inbound_address)
        name = display if display is not None else (inbound.name if inbound else "")
        return Address(ticket.inbound_address, name or self.helpdesk)

    def prefetch_auto_counts(self, session: Session, pending: Pending, addresses: set[str],
                             now: dt.datetime) -> None:
        """The intake's fast path: the automatic mail to each address in the window,
        for a whole batch in one query (before the batch added any)."""
        since = now - dt.timedelta(hours=1)
        counts: dict[str, int] = {
            address: int(n) for address, n in session.connection().execute(
                _AUTO_MAIL_COUNTS, {"addresses": addresses, "since": since})}
        for address in addresses:
            pending.auto_before.setdefault(address, counts.get(address, 0))

    def _rate_limited(self, session: Session, address: str, now: dt.datetime) -> bool:
        limit = self.settings.outbound.auto_mail_per_hour
        since = now - dt.timedelta(hours=1)

        def flushed() -> int:
            # On the session's connection, so no autoflush (flushing this message's
            # half-built rows would cost a round of SQL): rows not flushed yet are
            # counted apart.
            return int(session.connection().scalar(
                _AUTO_MAIL_COUNT, {"address": address, "since": since}) or 0)

        pending = pending_of(session)
        if pending is not None:  # the intake's fast path: once per address and batch
            return pending.auto_mail_count(address, flushed) >= limit
        unflushed = sum(1 for o in session.new if isinstance(o, OutboxRow)
                        and o.automatic and o.to_address == address)
        return flushed() + unflushed >= limit

    def enqueue(
        self,
        session: Session,
        ticket: Ticket | None,
        kind: str,
        out: Outbound,
        *,
        now: dt.datetime,
        automatic: bool,
        not_before: dt.datetime | None = None,
    ) -> bool:
        """Compose `out` and store it for delivery (not before `not_before`, if given);
        False when nothing is left to send."""
        to = tuple(a for a in out.to if self._deliverable(a.address, ticket))
        cc = tuple(a for a in out.cc if self._deliverable(a.address, ticket) and a not in to)
        if not to:
            log.info("ticket %s: %s mail has no recipient left", _num(ticket), kind)
            return False
        if automatic and self._rate_limited(session, to[0].address, now):
            log.warning(
                "ticket %s: %s mail to %s suppressed by the hourly rate limit",
                _num(ticket), kind, to[0].address,
            )
            if ticket is not None:
                add_event(session, ticket, at=now, actor="system", kind="mail-suppressed",
                          data={"kind": kind, "to": to[0].address})
            return False
        out = Outbound(
            sender=out.sender, to=to, cc=cc, subject=out.subject, text=out.text,
            reply_to=out.reply_to, html=out.html, in_reply_to=out.in_reply_to,
            references=out.references, auto_submitted=out.auto_submitted,
            attachments=out.attachments, extra_headers=out.extra_headers,
        )
        message_id = make_message_id(self.domain)
        raw = compose(out, message_id=message_id, date=now, loop_value=self.loop_value)
        add_row(session, OutboxRow, ticket, _outbox_values(
            channel="email", kind=kind, to_address=to[0].address,
            recipients=[a.address for a in (*to, *cc)], envelope_from=out.sender.address,
            message_id=message_id, raw=raw, payload=None, automatic=automatic, now=now,
            not_before=not_before))
        if ticket is not None:
            add_message_id(session, message_id, ticket, "out", now)
        return True

    # -- the messages --------------------------------------------------------------

    def acknowledge(
        self, session: Session, ticket: Ticket, article: Article, now: dt.datetime
    ) -> bool:
        """B6: one acknowledgement to the customer, from the address they wrote to."""
        text = self.templates.render(
            "ack.txt", ticket=ticket, hook=self.hooks.format(ticket.number),
            helpdesk=self.helpdesk, group=ticket.group, customer_name=ticket.customer_name,
        )
        out = Outbound(
            sender=self._sender(ticket),
            to=(Address(ticket.customer, ticket.customer_name),),
            subject=self.hooks.subject(ticket.number, ticket.subject),
            text=text,
            in_reply_to=article.message_id,
            references=(article.message_id,) if article.message_id else (),
            auto_submitted="auto-replied",
        )
        return self.enqueue(session, ticket, "ack", out, now=now, automatic=True)

    def agents_and_owner(self, ticket: Ticket) -> list[str]:
        """The agents of the ticket's group, and its owner if outside it: who may act
        on the ticket (B11), who is told of it (B7)."""
        group = self.settings.group(ticket.group)
        agents = list(group.agents) if group else []
        if ticket.owner and ticket.owner not in agents:
            agents.append(ticket.owner)
        return agents

    def notify_agents(
        self,
        session: Session,
        ticket: Ticket,
        article: Article | None,
        template: str,
        now: dt.datetime,
        *,
        agents: Iterable[str] | None = None,
        attach: bool = False,
        **context: Any,
    ) -> list[str]:
        """B7: one notification per agent, each with its own tokened Reply-To; returns
        the agents written to.

        `attach`: carry the article's files (chat channels, where the agent has no
        other way to see what the customer sent).
        """
        notified: list[str] = []
        files = (tuple(_attachment(a) for a in article.attachments)
                 if attach and article is not None else ())
        names = [a.filename for a in article.attachments] if article is not None else []
        hook = self.hooks.format(ticket.number)
        due = ticket.first_response_due or ticket.update_due
        text = self.templates.render(
            template, ticket=ticket, article=article, hook=hook, attachments=names,
            helpdesk=self.helpdesk,
            due_local=self.local_time(ticket.group, due) if due is not None else None,
            **context,
        )
        refs = _refs(article)
        for agent in agents if agents is not None else self.agents_and_owner(ticket):
            settings = self.settings.agent(agent)
            token = make_token(self.secret, ticket.number, agent)
            out = Outbound(
                sender=self._sender(ticket),
                to=(Address(agent, settings.name if settings else ""),),
                subject=self.hooks.subject(ticket.number, ticket.subject),
                text=text,
                reply_to=Address(reply_address(ticket.inbound_address, ticket.number, token),
                                 self.helpdesk),
                in_reply_to=refs[-1] if refs else None,
                references=refs,
                auto_submitted="auto-generated",
                attachments=files,
            )
            if self.enqueue(session, ticket, "notify", out, now=now, automatic=False):
                notified.append(agent)
        return notified

    def relay(
        self,
        session: Session,
        ticket: Ticket,
        article: Article,
        *,
        agent_name: str,
        participants: Sequence[tuple[str, str]],
        in_reply_to: str | None,
        references: Sequence[str],
        now: dt.datetime,
    ) -> bool:
        """B14: an agent's words to the customer, from the inbound address, no token."""
        others = tuple(Address(a, n) for a, n in participants if a != ticket.customer)
        if ticket.channel == "telegram" and ticket.channel_ref:
            # The customer is a chat, not a mailbox: the words go back to that chat...
            text = self.templates.render(
                "telegram_relay.txt", text=article.body, agent_name=agent_name,
                helpdesk=self.helpdesk, hook=self.hooks.format(ticket.number),
            )
            sent = self.enqueue_chat(
                session, ticket, "relay", bot=str(ticket.channel_ref["bot"]),
                chat_id=int(ticket.channel_ref["chat_id"]), text=text,
                attachments=article.attachments, automatic=False, now=now,
            )
            # ...and by mail to whoever the ticket's participants with a mailbox are
            # (`#cc`), as they would be copied on an email ticket. A chat has no
            # Message-IDs to thread on; replies thread on this mail's own.
            mailboxes = tuple(a for a in others if "@" in a.address)
            if mailboxes:
                self.enqueue(session, ticket, "relay", self._relay_mail(
                    ticket, article, agent_name, to=mailboxes, cc=()), now=now, automatic=False)
            return sent
        out = self._relay_mail(ticket, article, agent_name,
                               to=(Address(ticket.customer, ticket.customer_name),), cc=others,
                               in_reply_to=in_reply_to, references=references)
        return self.enqueue(session, ticket, "relay", out, now=now, automatic=False)

    def _relay_mail(
        self,
        ticket: Ticket,
        article: Article,
        agent_name: str,
        *,
        to: tuple[Address, ...],
        cc: tuple[Address, ...],
        in_reply_to: str | None = None,
        references: Sequence[str] = (),
    ) -> Outbound:
        text = self.templates.render(
            "relay.txt", text=article.body, agent_name=agent_name, helpdesk=self.helpdesk,
            hook=self.hooks.format(ticket.number),
        )
        display = f"{agent_name} via {self.helpdesk}" if agent_name else self.helpdesk
        return Outbound(
            sender=self._sender(ticket, display),
            to=to,
            cc=cc,
            subject=self.hooks.subject(ticket.number, ticket.subject, prefix="Re: "),
            text=text,
            in_reply_to=in_reply_to,
            references=tuple(references),
            attachments=tuple(_attachment(a) for a in article.attachments),
        )

    def enqueue_chat(
        self,
        session: Session,
        ticket: Ticket | None,
        kind: str,
        *,
        bot: str,
        chat_id: int,
        text: str,
        attachments: Sequence[Any] = (),
        automatic: bool,
        now: dt.datetime,
        not_before: dt.datetime | None = None,
    ) -> bool:
        """Store a chat message for delivery by the channel's sender (outbox `payload`).

        Files are referenced by their blob's SHA-256, not copied. What the bot says
        by itself (`automatic`) shares the per-recipient hourly cap with mail.
        """
        to = f"telegram:{bot}:{chat_id}"
        if automatic and self._rate_limited(session, to, now):
            log.warning("ticket %s: %s chat message to %s suppressed by the hourly rate limit",
                        _num(ticket), kind, to)
            if ticket is not None:
                add_event(session, ticket, at=now, actor="system", kind="mail-suppressed",
                          data={"kind": kind, "to": to})
            return False
        bot_settings = self.settings.telegram_bot(bot)
        sender = (ticket.inbound_address if ticket is not None
                  else bot_settings.inbound_address if bot_settings is not None else "")
        add_row(session, OutboxRow, ticket, _outbox_values(
            channel="telegram", kind=kind, to_address=to, recipients=[to],
            envelope_from=sender, message_id=None, raw=None,
            payload={
                "bot": bot, "chat_id": chat_id, "text": text,
                "attachments": [{"sha256": a.sha256, "filename": a.filename,
                                 "content_type": a.content_type, "size": a.size}
                                for a in attachments],
            },
            automatic=automatic, now=now, not_before=not_before))
        return True

    def relay_failed(
        self, session: Session, ticket: Ticket, agent: str, problem: str, *,
        in_reply_to: str | None, now: dt.datetime,
    ) -> bool:
        """The agent's words were stored but nobody could be written to: say so."""
        text = self.templates.render(
            "relay_failed.txt", hook=self.hooks.format(ticket.number), problem=problem,
            helpdesk=self.helpdesk,
        )
        return self._to_agent(session, ticket, agent, "Not sent: ", text,
                              in_reply_to=in_reply_to, now=now)

    def command_error(
        self,
        session: Session,
        ticket: Ticket,
        agent: str,
        problems: Sequence[str],
        valid: Sequence[str],
        *,
        in_reply_to: str | None,
        now: dt.datetime,
    ) -> bool:
        """B13/B16: one error mail to the agent; nothing else happened."""
        text = self.templates.render(
            "command_error.txt", hook=self.hooks.format(ticket.number), problems=problems,
            valid=valid, helpdesk=self.helpdesk,
        )
        return self._to_agent(session, ticket, agent, "Not applied: ", text,
                              in_reply_to=in_reply_to, now=now)

    def _to_agent(
        self, session: Session, ticket: Ticket, agent: str, prefix: str, text: str, *,
        in_reply_to: str | None, now: dt.datetime,
    ) -> bool:
        """An error mail to an agent about their reply: automatic, so rate-capped."""
        settings = self.settings.agent(agent)
        out = Outbound(
            sender=self._sender(ticket),
            to=(Address(agent, settings.name if settings else ""),),
            subject=self.hooks.subject(ticket.number, ticket.subject, prefix=prefix),
            text=text,
            in_reply_to=in_reply_to,
            references=(in_reply_to,) if in_reply_to else (),
            auto_submitted="auto-replied",
        )
        return self.enqueue(session, ticket, "error", out, now=now, automatic=True)

    def sla_mail(
        self,
        session: Session,
        ticket: Ticket,
        template: str,
        recipients: Sequence[str],
        *,
        kind: str,
        subject_prefix: str,
        now: dt.datetime,
        not_before: dt.datetime | None = None,
        to_customer: bool = False,
        **context: Any,
    ) -> list[str]:
        """Escalation mail (issue 6): warnings, breaches, reminders, incident notices;
        returns the recipients written to.

        One message per recipient. Staff get a tokened Reply-To, so they can act on
        the ticket by answering; the customer gets what an acknowledgement looks
        like (capped per hour like it), on the chat when the ticket came from one.
        `not_before` holds the row until then: the receiving group's business hours.
        """
        text = self.templates.render(
            template, ticket=ticket, hook=self.hooks.format(ticket.number),
            helpdesk=self.helpdesk, **context,
        )
        subject = self.hooks.subject(ticket.number, ticket.subject, prefix=subject_prefix)
        sent: list[str] = []
        for address in dict.fromkeys(a.lower() for a in recipients):
            if to_customer and ticket.channel == "telegram" and ticket.channel_ref:
                queued = self.enqueue_chat(
                    session, ticket, kind, bot=str(ticket.channel_ref["bot"]),
                    chat_id=int(ticket.channel_ref["chat_id"]), text=text, automatic=True,
                    now=now, not_before=not_before,
                )
            elif to_customer:
                out = Outbound(
                    sender=self._sender(ticket),
                    to=(Address(address, ticket.customer_name
                                if address == ticket.customer else ""),),
                    subject=subject, text=text, auto_submitted="auto-generated",
                )
                queued = self.enqueue(session, ticket, kind, out, now=now, automatic=True,
                                      not_before=not_before)
            else:
                agent = self.settings.agent(address)
                token = make_token(self.secret, ticket.number, address)
                out = Outbound(
                    sender=self._sender(ticket),
                    to=(Address(address, agent.name if agent else ""),),
                    subject=subject, text=text,
                    reply_to=Address(reply_address(ticket.inbound_address, ticket.number,
                                                   token), self.helpdesk),
                    auto_submitted="auto-generated",
                )
                queued = self.enqueue(session, ticket, kind, out, now=now, automatic=False,
                                      not_before=not_before)
            if queued:
                sent.append(address)
        return sent


def _refs(article: Article | None) -> tuple[str, ...]:
    if article is None or not article.message_id:
        return ()
    return (article.message_id,)


def _attachment(att: Any) -> Any:
    from gateway.message import Attachment

    return Attachment(att.filename, att.content_type, att.blob.data)


def _num(ticket: Ticket | None) -> str:
    return ticket.number if ticket is not None else "-"


def _outbox_values(*, channel: str, kind: str, to_address: str, recipients: list[str],
                   envelope_from: str, message_id: str | None, raw: bytes | None,
                   payload: dict[str, Any] | None, automatic: bool, now: dt.datetime,
                   not_before: dt.datetime | None) -> dict[str, Any]:
    """A new outbox row's columns: always the same ones (see `add_row`)."""
    return {
        "channel": channel, "kind": kind, "to_address": to_address, "recipients": recipients,
        "envelope_from": envelope_from, "message_id": message_id, "raw": raw,
        "payload": payload, "state": "pending", "automatic": automatic, "attempts": 0,
        "next_attempt_at": not_before if not_before is not None and not_before > now else now,
        "created_at": now,
    }
