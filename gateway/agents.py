"""An agent's emailed reply: authorisation, commands, internal notes and relay (B11-B16).

A reply arrives on a tokened address (`help+<number>.<token>@...`). It is acted
on only when the token is the HMAC for that ticket and the From address, the
sender is an agent of the ticket's group or its owner, and the mail is not
automatic. Everything else runs nothing and relays nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway import commands
from gateway.config import Settings
from gateway.followup import (
    Hooks,
    parse_reply_address,
    ticket_by_number,
    token_remover,
    verify_token,
)
from gateway.mail.auto import AutoInfo
from gateway.mail.quotes import strip_reply
from gateway.message import Inbound, ParsedMail
from gateway.notify import Notifier
from gateway.store.models import Article, Participant, Ticket
from gateway.store.pending import add_event, add_message_id, add_row

if TYPE_CHECKING:
    from gateway.pipeline import Disposition

log = logging.getLogger(__name__)
security = logging.getLogger("gateway.security")

# The signature parts of multipart/signed mail (RFC 8551, RFC 3156): not content.
_SIGNATURES = frozenset({"application/pkcs7-signature", "application/x-pkcs7-signature",
                         "application/pgp-signature"})

StoreArticle = Callable[..., Article]
Changed = Callable[[Session, Ticket, str, dt.datetime], None]


class AgentReplies:
    def __init__(
        self, settings: Settings, notifier: Notifier, hooks: Hooks, changed: Changed
    ) -> None:
        self.settings = settings
        self.changed = changed
        self.notifier = notifier
        self.hooks = hooks
        self.secret = settings.daemon.secret.get_secret_value().encode()
        self.remove_tokens = token_remover(settings.own_domains)

    def handle(
        self,
        session: Session,
        inbound: Inbound,
        mail: ParsedMail,
        token_address: str,
        info: AutoInfo,
        now: dt.datetime,
        store_article: StoreArticle,
    ) -> Disposition:
        from gateway.pipeline import Disposition, Outcome, StageError

        reply = parse_reply_address(token_address)
        assert reply is not None
        ticket = ticket_by_number(session, reply.number)
        if ticket is None:
            raise StageError("agent", "unknown-ticket",
                             f"reply address names ticket {reply.number}, which does not exist")
        sender = mail.sender.address if mail.sender else ""
        agent = self.settings.agent(sender) if sender else None
        valid = bool(sender) and verify_token(self.secret, ticket.number, sender, reply.token)
        mid = mail.message_id

        if agent is None or not valid:
            # B16: nobody's command runs, nothing is relayed, no mail goes back.
            why = "forged agent address (token not valid for sender)" if agent else (
                "sender is not an agent" if sender else "no sender")
            if agent is not None:
                security.warning("ticket %s: reply with an invalid token from agent %s "
                                 "(message %s): nothing executed", ticket.number, sender, mid)
            store_article(session, ticket, inbound, mail, info, now,
                          kind="internal", role="system")
            add_event(session, ticket, at=now, actor=sender or "unknown",
                      kind="token-refused", data={"why": why, "message_id": mid})
            log.info("message %s: token mail for ticket %s kept as internal note: %s",
                     mid, ticket.number, why)
            return Disposition(Outcome.NOTE, ticket.number, mid, reason=why)

        if info.is_automatic:
            # An agent's out-of-office: stored (B17), never executed or relayed (B11).
            store_article(session, ticket, inbound, mail, info, now,
                          kind="public", role="agent")
            log.info("message %s: automatic mail from agent %s stored on %s",
                     mid, sender, ticket.number)
            return Disposition(Outcome.NOTE, ticket.number, mid, reason="automatic")

        if sender not in self.notifier.agents_and_owner(ticket):
            self._reject(session, ticket, sender, mid, now,
                         [f"you are not an agent of {ticket.group!r} nor the owner of "
                          f"{self.hooks.format(ticket.number)}"])
            return Disposition(Outcome.REJECTED, ticket.number, mid, reason="not authorised")

        block = commands.split_block(mail.text)
        # Scripts may put commands in a header instead of the body; they run first.
        header_cmds = commands.from_headers(mail.header_all(commands.COMMAND_HEADER))
        block = commands.CommandBlock(header_cmds + block.commands, block.text)
        problems = commands.check(block.commands, self.settings)
        if problems:
            self._reject(session, ticket, sender, mid, now, problems)
            return Disposition(Outcome.REJECTED, ticket.number, mid, reason="bad command")

        internal = any(c.name == "note" for c in block.commands)
        # The HTML stands in for a blank text part (HTML-only mail); after a command
        # block a blank text means "commands only", and the HTML still has the commands.
        text = strip_reply(block.text, None if block.commands else mail.html).strip()
        old_group = ticket.group
        for cmd in block.commands:
            self._apply(session, ticket, cmd, sender, now)

        article: Article | None = None
        # A file sent with no words is an answer too (a screenshot, the log asked for);
        # an inline part alone is a signature's logo, and an S/MIME or PGP signature
        # part signs the commands: neither is a reply.
        if text or any(not a.inline and a.content_type.lower() not in _SIGNATURES
                       for a in mail.attachments):
            if not internal:
                text, mail = self._without_tokens(text, mail, sender, ticket)
            article = store_article(session, ticket, inbound, mail, info, now,
                                    kind="internal" if internal else "public",
                                    role="agent", body=text)
        elif mid:
            add_message_id(session, mid, ticket, "in", now)
        ticket.updated_at = now
        if article is not None and not internal:
            self._relay(session, ticket, article, agent.name, sender, mid, now)
        if ticket.group != old_group:
            self.notifier.notify_agents(session, ticket, self._last_customer(session, ticket),
                                        "agent_group.txt", now, actor=sender)
        log.info("message %s: agent %s on ticket %s: %d command(s), %s",
                 mid, sender, ticket.number, len(block.commands),
                 "no text" if article is None else article.kind)
        return Disposition(Outcome.AGENT_REPLY, ticket.number, mid)

    # -- steps ---------------------------------------------------------------------

    def _without_tokens(
        self, text: str, mail: ParsedMail, sender: str, ticket: Ticket
    ) -> tuple[str, ParsedMail]:
        """The reply as its customer and Cc's will see it, with every reply address of
        ours back to its plain form (B14). A notification the agent forwarded or
        attached carries the agent's tokened Reply-To; relayed, it would let anyone
        who forges the agent's From act as the agent."""
        def clean(value: str) -> str:
            return self.remove_tokens(value.encode("utf-8", "surrogatepass")).decode(
                "utf-8", "surrogatepass")

        attachments = tuple(dataclasses.replace(a, data=self.remove_tokens(a.data))
                            for a in mail.attachments)
        cleaned = dataclasses.replace(
            mail, attachments=attachments, html=None if mail.html is None else clean(mail.html))
        clean_text = clean(text)
        if cleaned != mail or clean_text != text:
            security.warning("ticket %s: reply of %s carried a reply token; removed before "
                             "relaying", ticket.number, sender)
        return clean_text, cleaned


    def _reject(self, session: Session, ticket: Ticket, agent: str, mid: str | None,
                now: dt.datetime, problems: list[str]) -> None:
        """B13: one error mail, nothing executed; the Message-ID is kept for dedup only."""
        if mid:
            add_message_id(session, mid, None, "rejected", now)
        add_event(session, ticket, at=now, actor=agent, kind="reply-rejected",
                  data={"problems": problems, "message_id": mid})
        self.notifier.command_error(session, ticket, agent, problems,
                                    commands.valid_commands(), in_reply_to=mid, now=now)
        log.info("message %s: reply from %s to ticket %s rejected: %s",
                 mid, agent, ticket.number, "; ".join(problems))

    def _apply(self, session: Session, ticket: Ticket, cmd: commands.Command,
               agent: str, now: dt.datetime) -> None:
        data: dict[str, Any] = {"command": cmd.line}
        if cmd.name in ("close", "open", "pending"):
            new = {"close": "closed", "open": "open", "pending": "pending"}[cmd.name]
            data.update({"from": ticket.state, "to": new})
            ticket.state = new
            ticket.closed_at = now if new == "closed" else None
            # The SLA engine reminds the owner at `pending_until` (issue 6).
            # The agent means the time where the group works (its calendar's zone).
            ticket.pending_until = (
                commands.parse_until(cmd.arg, self.notifier.zone_for(ticket.group))
                if cmd.name == "pending" and cmd.arg else None)
            if ticket.pending_until is not None:
                data["until"] = ticket.pending_until.isoformat()
        elif cmd.name == "priority":
            data.update({"from": ticket.priority, "to": cmd.arg.lower()})
            ticket.priority = cmd.arg.lower()
        elif cmd.name == "group":
            data.update({"from": ticket.group, "to": cmd.arg})
            ticket.group = cmd.arg
        elif cmd.name == "assign":
            owner = agent if cmd.arg.lower() == "me" else cmd.arg.lower()
            data.update({"from": ticket.owner, "to": owner})
            ticket.owner = owner
        elif cmd.name == "cc":
            address = cmd.arg.lower()
            exists = session.scalar(select(Participant.id).where(
                Participant.ticket_id == ticket.id, Participant.address == address))
            if exists is None:
                add_row(session, Participant, ticket,
                        {"address": address, "name": "", "role": "cc"})
            data["address"] = address
        add_event(session, ticket, at=now, actor=agent, kind=f"command:{cmd.name}",
                  data=data)
        if cmd.name in ("close", "open", "pending"):
            self.changed(session, ticket, "state", now)
        elif cmd.name in ("group", "priority", "major"):
            self.changed(session, ticket, cmd.name, now)

    def _relay(self, session: Session, ticket: Ticket, article: Article, agent_name: str,
               agent: str, mid: str | None, now: dt.datetime) -> None:
        parts = session.execute(select(Participant.address, Participant.name).where(
            Participant.ticket_id == ticket.id)).all()
        # Only the customer's Message-IDs, newest last: threading needs nothing else, and
        # loading the articles themselves would read every stored message body.
        refs: list[str] = [m for m in session.scalars(
            select(Article.message_id).where(
                Article.ticket_id == ticket.id, Article.author_role == "customer",
                Article.message_id.is_not(None))
            .order_by(Article.id.desc()).limit(10)) if m][::-1]
        sent = self.notifier.relay(
            session, ticket, article, agent_name=agent_name,
            participants=[(a, n) for a, n in parts],
            in_reply_to=refs[-1] if refs else None,
            references=refs, now=now,
        )
        if not sent:
            # Nobody could be written to (e.g. an address outbound mail cannot encode):
            # the customer has no answer, so the ticket is not answered either.
            problem = f"{ticket.customer!r} cannot be written to"
            add_event(session, ticket, at=now, actor=agent, kind="relay-undeliverable",
                      data={"customer": ticket.customer, "message_id": mid})
            self.notifier.relay_failed(session, ticket, agent, problem, in_reply_to=mid,
                                       now=now)
            log.warning("ticket %s: reply from %s stored but not sent: %s", ticket.number,
                        agent, problem)
            return
        if ticket.state == "new":
            add_event(session, ticket, at=now, actor="system", kind="state",
                      data={"from": "new", "to": "open", "why": "first agent reply"})
            ticket.state = "open"
            self.changed(session, ticket, "state", now)
        if ticket.first_response_at is None:
            ticket.first_response_at = now
        self.changed(session, ticket, "agent-reply", now)

    def _last_customer(self, session: Session, ticket: Ticket) -> Article | None:
        return session.scalars(
            select(Article).where(Article.ticket_id == ticket.id,
                                  Article.author_role == "customer")
            .order_by(Article.id.desc()).limit(1)
        ).first()
