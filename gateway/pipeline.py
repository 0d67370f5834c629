"""ingest(inbound): the ordered steps from received bytes to stored ticket changes.

parse -> dedup -> loop check -> automatic-mail check -> report? -> reply token?
-> follow-up match -> routing -> persist. Every step runs inside the caller's
transaction (see `intake`); a step that raises is reported as a `StageError`
naming the step, and the caller quarantines the message with that stage and
reason. Nothing here talks to the network.

Under the intake's fast path autoflush is off: every lookup of a row that an
earlier message of the same batch may have added goes through
`gateway.store.pending` first.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gateway import agents
from gateway.config import Settings
from gateway.followup import (
    Hooks,
    parse_reply_address,
    ticket_by_number,
    tickets_by_message_ids,
)
from gateway.mail import auto
from gateway.mail.parse import ParseError, parse_mail
from gateway.message import Address, Channel, Inbound, ParsedMail
from gateway.notify import Notifier
from gateway.routing import Decision, RoutingFacts, RuleReloader
from gateway.store.models import (
    Article,
    Attachment,
    Blob,
    Counter,
    MessageId,
    Participant,
    QuarantineRow,
    Ticket,
)
from gateway.store.pending import (
    Pending,
    add_event,
    add_message_id,
    add_row,
    autoflushing,
    pending_of,
)

log = logging.getLogger(__name__)

# The per-message statements are built once: building a statement and its cache key
# each time cost several times what SQLite takes to run it.
# Dedup, through the session (so it autoflushes outside the intake's fast path).
_SEEN = select(MessageId.message_id).where(MessageId.message_id == bindparam("key"))
_SEEN_ANY = select(MessageId.message_id).where(
    MessageId.message_id.in_(bindparam("keys", expanding=True)))
# The ticket-number counter, in Core on the session's connection (see next_ticket_number).
_counters = cast(Table, Counter.__table__)
_BUMP_COUNTER = (
    update(_counters).where(_counters.c.name == bindparam("counter"))
    .values(value=_counters.c.value + 1).returning(_counters.c.value)
)


class Outcome(enum.StrEnum):
    CREATED = "created"
    FOLLOWUP = "followup"
    AGENT_REPLY = "agent-reply"
    REJECTED = "rejected"  # agent reply not applied (error mail sent)
    NOTE = "note"  # kept as an internal note (reports, unauthorised token mail)
    DROPPED = "dropped"
    DUPLICATE = "duplicate"
    LOOP = "loop"
    IGNORED = "ignored"  # unmatched delivery report
    QUARANTINED = "quarantined"
    COMMAND = "command"  # a chat command answered (/start, /status, /close, ...)
    QUEUED = "queued"  # committed to the spool under a burst; the pipeline runs later


@dataclass(frozen=True, slots=True)
class Disposition:
    """What the pipeline decided for one message."""

    outcome: Outcome
    ticket: str | None = None
    message_id: str | None = None
    reason: str = ""


class TicketObserver(Protocol):
    """Told of every ticket change inside the transaction that makes it (e.g. SLA clocks).

    `change` is one of: "created", "customer-message", "agent-reply" (public, relayed),
    "state" (state changed; the ticket already has the new state), "group", "priority",
    "major" (`#major`: declared a major incident).
    """

    def ticket_changed(
        self, session: Session, ticket: Ticket, change: str, now: dt.datetime
    ) -> None: ...


class StageError(Exception):
    """A step failed; the message goes to quarantine with this stage and reason."""

    def __init__(self, stage: str, reason: str, detail: str) -> None:
        super().__init__(f"{stage}: {reason}: {detail}")
        self.stage = stage
        self.reason = reason
        self.detail = detail


@contextmanager
def stage(name: str) -> Iterator[None]:
    try:
        yield
    except StageError:
        raise
    except ParseError as exc:
        raise StageError(name, exc.reason, exc.detail) from exc
    except Exception as exc:
        raise StageError(name, type(exc).__name__, str(exc)[:2000]) from exc


class Pipeline:
    """The mail path's decisions, over one database session at a time."""

    def __init__(
        self, settings: Settings, rules: RuleReloader, notifier: Notifier, hooks: Hooks
    ) -> None:
        self.settings = settings
        self.rules = rules
        self.notifier = notifier
        self.hooks = hooks
        self.own_domains = frozenset({settings.daemon.message_id_domain})
        self.observers: list[TicketObserver] = []
        self.agent_replies = agents.AgentReplies(settings, notifier, hooks, self.changed)

    def changed(self, session: Session, ticket: Ticket, change: str, now: dt.datetime) -> None:
        for observer in self.observers:
            observer.ticket_changed(session, ticket, change, now)

    # -- entry point ---------------------------------------------------------------

    def prepare(self, session: Session, inbounds: list[Inbound],
                now: dt.datetime) -> list[ParsedMail | None]:
        """The intake's fast path, before a batch: parse its mail, then look up every
        Message-ID and every sender's recent automatic mail in one query each, instead
        of one per message. None where `ingest` must parse by itself (chat updates,
        mail that does not parse: it says why there).
        """
        mails: list[ParsedMail | None] = []
        for inbound in inbounds:
            mail = None
            if inbound.channel is not Channel.TELEGRAM:
                with suppress(ParseError):  # `ingest` parses it again and says why
                    mail = parse_mail(inbound.raw)
            mails.append(mail)
        pending = pending_of(session)
        if pending is None:
            return mails
        keys = {k for inbound, mail in zip(inbounds, mails, strict=True) if mail is not None
                and (k := mail.message_id or inbound.channel_message_id)}
        if keys:
            pending.looked_up_ids |= keys
            pending.found_ids |= set(session.connection().scalars(_SEEN_ANY, {"keys": keys}))
        senders = {mail.sender.address for mail in mails if mail is not None and mail.sender}
        if senders:
            self.notifier.prefetch_auto_counts(session, pending, senders, now)
        return mails

    def ingest(self, session: Session, inbound: Inbound, now: dt.datetime,
               mail: ParsedMail | None = None) -> Disposition:
        """One message, from bytes (or `mail`, parsed by `prepare`) to stored changes."""
        if inbound.channel is Channel.TELEGRAM:
            # Chat updates take their own path (gateway.chat), reusing the steps below.
            from gateway import chat

            # The chat path looks up the chat's tickets, articles and update ids.
            with autoflushing(session):
                return chat.ingest(self, session, inbound, now)
        if mail is None:
            with stage("parse"):
                mail = parse_mail(inbound.raw)
        mid = mail.message_id
        # Mail without Message-ID (scripts) is deduplicated only by its channel's own id
        # (an IMAP mailbox's SHA-256 of the bytes), so a re-fetch is a no-op.
        key = mid or inbound.channel_message_id
        pending = pending_of(session)
        if pending is not None and self._reads_pending(pending, mail):
            pending.flush(session)
        with stage("dedup"):
            if key and self._seen(session, pending, key):
                log.info("message %s: duplicate, discarded", key)
                return Disposition(Outcome.DUPLICATE, message_id=mid)
        result = self._ingest_mail(session, inbound, mail, now)
        if not mid and key and result.outcome is not Outcome.QUARANTINED:
            add_message_id(session, key, None, "channel", now)
        return result

    def _seen(self, session: Session, pending: Pending | None, key: str) -> bool:
        known = pending.seen(key) if pending is not None else None
        if known is not None:
            return known
        return session.scalar(_SEEN, {"key": key}) is not None

    def _reads_pending(self, pending: Pending, mail: ParsedMail) -> bool:
        """Could this customer mail's lookups hit a row the batch has not flushed yet?

        Threading looks up Message-IDs, subject hooks look up ticket numbers, and
        whether a sender may follow up (and which To/Cc are new) looks up the ticket's
        participants by address. (Dedup asks `Pending.seen`, which knows the batch.)
        """
        if pending.any_in((*mail.references, *mail.in_reply_to), pending.message_ids):
            return True
        if pending.numbers and pending.any_in(self.hooks.find(mail.subject), pending.numbers):
            return True
        addresses = [a.address for a in (*mail.to, *mail.cc, *mail.reply_to)]
        if mail.sender is not None:
            addresses.append(mail.sender.address)
        return pending.any_in(addresses, pending.addresses)

    def _ingest_mail(
        self, session: Session, inbound: Inbound, mail: ParsedMail, now: dt.datetime
    ) -> Disposition:
        mid = mail.message_id
        with stage("loop"):
            loop = auto.is_loop(
                mail, loop_value=self.notifier.loop_value, own_domains=self.own_domains
            )
            if loop:
                log.info("message %s: our own mail came back (%s), discarded", mid, loop)
                return Disposition(Outcome.LOOP, message_id=mid, reason=loop)
            info = auto.classify(mail, inbound.mail_from)
        if info.is_report:
            with stage("report"), autoflushing(session):
                return self._report(session, inbound, mail, now)
        with stage("token"):
            token_addr = self._token_address(inbound, mail)
        if token_addr is not None:
            # Agent replies and commands read the ticket's articles, participants and
            # more: make the batch so far visible rather than check each lookup.
            with stage("agent"), autoflushing(session):
                return self.agent_replies.handle(
                    session, inbound, mail, token_addr, info, now, self._store_article
                )
        if mail.sender is None:
            mail = _with_fallback_sender(mail, inbound)
        with stage("followup"):
            ticket, linked = self._find_ticket(session, mail)
        with stage("routing"):
            decision = self.rules.current.evaluate(self._facts(inbound, mail))
            if decision.drop:
                log.info("message %s: dropped by rule %s", mid, decision.drop_rule)
                if mid:
                    add_message_id(session, mid, None, "dropped", now)
                return Disposition(Outcome.DROPPED, message_id=mid, reason=decision.drop_rule or "")
        if ticket is not None:
            with stage("persist"), autoflushing(session):
                return self._followup(session, inbound, mail, ticket, info, now)
        with stage("persist"):
            return self._create(session, inbound, mail, decision, info, linked, now)

    # -- steps ---------------------------------------------------------------------

    def _token_address(self, inbound: Inbound, mail: ParsedMail) -> str | None:
        """The tokened reply address this mail was delivered to, if any."""
        candidates = list(inbound.rcpt_tos)
        if not candidates:
            # No envelope (IMAP): the headers are all we have.
            candidates = [a.address for a in (*mail.to, *mail.cc)]
            candidates += [v.strip() for v in mail.header_all("Delivered-To")]
        for addr in candidates:
            parsed = parse_reply_address(addr)
            if parsed is not None and self.settings.inbound_for(parsed.base) is not None:
                return addr.lower()
        return None

    def _find_ticket(
        self, session: Session, mail: ParsedMail
    ) -> tuple[Ticket | None, Ticket | None]:
        """(ticket to append to, ticket to link a new one to) per B8."""
        candidates: list[Ticket] = []
        for number in self.hooks.find(mail.subject):
            t = ticket_by_number(session, number)
            if t is not None:
                candidates.append(t)
        for tid in tickets_by_message_ids(session, (*mail.references, *mail.in_reply_to)):
            t = session.get(Ticket, tid)
            if t is not None and t not in candidates:
                candidates.append(t)
        assert mail.sender is not None
        sender = mail.sender.address
        for t in candidates:
            if self._may_follow_up(session, t, sender):
                return t, None
        return None, (candidates[0] if candidates else None)

    def _may_follow_up(self, session: Session, ticket: Ticket, sender: str) -> bool:
        if sender == ticket.customer:
            return True
        if sender in self.notifier.agents_and_owner(ticket):
            return True
        found = session.scalar(
            select(Participant.id).where(
                Participant.ticket_id == ticket.id, Participant.address == sender
            )
        )
        return found is not None

    def _inbound_address(self, inbound: Inbound, mail: ParsedMail) -> str | None:
        """B2: the envelope decides (the headers only where there is none)."""
        return self.settings.inbound_of(
            inbound.rcpt_tos or [a.address for a in (*mail.to, *mail.cc)])

    def _facts(self, inbound: Inbound, mail: ParsedMail) -> RoutingFacts:
        return RoutingFacts(
            subject=mail.subject,
            sender=mail.sender.address if mail.sender else "",
            to=tuple(a.address for a in mail.to),
            cc=tuple(a.address for a in mail.cc),
            body=mail.text,
            headers=mail.headers,
            channel=inbound.channel.value,
            inbound=self._inbound_address(inbound, mail),
        )

    def _create(
        self,
        session: Session,
        inbound: Inbound,
        mail: ParsedMail,
        decision: Decision,
        info: auto.AutoInfo,
        linked: Ticket | None,
        now: dt.datetime,
    ) -> Disposition:
        assert mail.sender is not None
        address = self._inbound_address(inbound, mail)
        assert address is not None  # every channel delivers to an [[inbound]] address
        group = decision.group
        if group is None:
            configured = self.settings.inbound_for(address)
            group = configured.default_group if configured else self.settings.groups[0].name
        ticket = open_ticket(
            session, now, decision, subject=mail.subject or "(no subject)", group=group,
            customer=mail.sender.address, customer_name=mail.sender.name,
            channel=inbound.channel.value, inbound_address=address, linked=linked,
        )
        self._add_participants(session, ticket, mail, customer=True)
        article = self._store_article(session, ticket, inbound, mail, info, now,
                                      kind="public", role="customer")
        add_event(session, ticket, at=now, actor=ticket.customer, kind="created", data={
            "message_id": mail.message_id, "channel": inbound.channel.value,
            "inbound": address, "automatic": list(info.reasons),
            "linked": linked.number if linked is not None else None,
        })
        add_event(session, ticket, at=now, actor="routing", kind="routed",
                  data=routed_data(ticket, decision))
        self.changed(session, ticket, "created", now)
        if not info.is_automatic and not self.notifier.is_own(ticket.customer):
            self.notifier.acknowledge(session, ticket, article, now)
        self.notifier.notify_agents(session, ticket, article, "agent_new.txt", now)
        log.info("message %s: new ticket %s in %s", mail.message_id, ticket.number, group)
        return Disposition(Outcome.CREATED, ticket.number, mail.message_id)

    def _followup(
        self,
        session: Session,
        inbound: Inbound,
        mail: ParsedMail,
        ticket: Ticket,
        info: auto.AutoInfo,
        now: dt.datetime,
    ) -> Disposition:
        assert mail.sender is not None
        sender = mail.sender.address
        is_agent = sender in self.notifier.agents_and_owner(ticket)
        role = "agent" if is_agent else "customer"
        if not is_agent:
            self._add_participants(session, ticket, mail, customer=False)
        article = self._store_article(session, ticket, inbound, mail, info, now,
                                      kind="public", role=role)
        ticket.updated_at = now
        if not info.is_automatic and not is_agent:
            if ticket.state in ("pending", "closed"):
                add_event(session, ticket, at=now, actor=sender, kind="state",
                          data={"from": ticket.state, "to": "open",
                                "why": "customer follow-up"})
                ticket.state = "open"
                ticket.closed_at = None
                self.changed(session, ticket, "state", now)
            self.changed(session, ticket, "customer-message", now)
            self.notifier.notify_agents(session, ticket, article, "agent_followup.txt", now)
        log.info("message %s: follow-up on ticket %s", mail.message_id, ticket.number)
        return Disposition(Outcome.FOLLOWUP, ticket.number, mail.message_id)

    def _report(
        self, session: Session, inbound: Inbound, mail: ParsedMail, now: dt.datetime
    ) -> Disposition:
        """B18: a delivery or read report becomes an internal note on its ticket."""
        report = auto.parse_report(inbound.raw, mail)
        ids = list(report.original_message_ids) if report else []
        ids += list(mail.in_reply_to)
        found = tickets_by_message_ids(session, ids)
        ticket = session.get(Ticket, found[0]) if found else None
        if ticket is None:
            log.info("message %s: report matches no ticket, ignored", mail.message_id)
            if mail.message_id:
                add_message_id(session, mail.message_id, None, "dropped", now)
            return Disposition(Outcome.IGNORED, message_id=mail.message_id,
                               reason="unmatched report")
        summary = report.summary if report else mail.text
        sender = mail.sender.address if mail.sender else (inbound.mail_from or "mailer-daemon")
        article = self._store_article(
            session, ticket, inbound, mail, auto.AutoInfo(True, ("report",), True), now,
            kind="internal", role="system", body=summary, sender=sender,
        )
        del article
        if report is not None and report.permanent:
            for rcpt in report.failed_recipients:
                part = session.scalar(select(Participant).where(
                    Participant.ticket_id == ticket.id, Participant.address == rcpt.lower()))
                if part is not None:
                    part.bouncing = ", ".join(report.statuses)
                add_event(session, ticket, at=now, actor="system", kind="bounce", data={
                    "recipient": rcpt, "statuses": list(report.statuses)})
        log.info("message %s: report attached to ticket %s", mail.message_id, ticket.number)
        return Disposition(Outcome.NOTE, ticket.number, mail.message_id, reason="report")

    # -- persistence helpers -------------------------------------------------------

    def _add_participants(
        self, session: Session, ticket: Ticket, mail: ParsedMail, *, customer: bool
    ) -> None:
        """B5: customer plus To/Cc, minus our own addresses and agents; never Bcc."""
        existing: set[str] = set() if customer else set(session.scalars(
            select(Participant.address).where(Participant.ticket_id == ticket.id)
        ))
        wanted: list[tuple[str, str, str]] = []
        if customer:
            assert mail.sender is not None
            wanted.append((mail.sender.address, mail.sender.name, "customer"))
        for a in (*mail.to, *mail.cc):
            wanted.append((a.address, a.name, "cc"))
        for address, name, role in wanted:
            if address in existing or self.notifier.is_own(address):
                continue
            if self.settings.agent(address) is not None:
                continue
            existing.add(address)
            add_row(session, Participant, ticket, {"address": address, "name": name, "role": role})

    def _store_article(
        self,
        session: Session,
        ticket: Ticket,
        inbound: Inbound,
        mail: ParsedMail,
        info: auto.AutoInfo,
        now: dt.datetime,
        *,
        kind: str,
        role: str,
        body: str | None = None,
        sender: str | None = None,
    ) -> Article:
        article = Article(
            ticket=ticket,
            kind=kind,
            direction="in",
            channel=inbound.channel.value,
            sender=sender or (mail.sender.address if mail.sender else ""),
            sender_name=mail.sender.name if mail.sender else "",
            author_role=role,
            to=[a.address for a in mail.to],
            cc=[a.address for a in mail.cc],
            subject=mail.subject,
            body=mail.text if body is None else body,
            html=mail.html,
            message_id=mail.message_id,
            automatic=info.is_automatic,
            raw=inbound.raw,
            created_at=now,
            # Initialised here so reading it later is not a lazy SELECT.
            attachments=[],
        )
        session.add(article)
        blobs: dict[str, Blob] = {}  # the same file twice in one mail is one blob
        pending = pending_of(session)
        for att in mail.attachments:
            digest = hashlib.sha256(att.data).hexdigest()
            if pending is not None and digest not in blobs and digest in pending.blobs:
                pending.flush(session)  # an earlier message of the batch brought it
            blob = blobs.get(digest) or session.get(Blob, digest)
            if blob is None:
                blob = Blob(sha256=digest, size=len(att.data), data=att.data)
                session.add(blob)
            blobs[digest] = blob
            # `blob` set, not only `sha256`: the rows may not be flushed yet, and a
            # pending attachment's blob would not load (chat notifications carry it).
            article.attachments.append(Attachment(
                filename=att.filename, content_type=att.content_type, sha256=digest,
                size=len(att.data), blob=blob,
            ))
        if mail.message_id:
            add_message_id(session, mail.message_id, ticket, "in", now)
        # No flush here: the rows go out together, batched by table.
        return article


def routed_data(ticket: Ticket, decision: Decision) -> dict[str, Any]:
    """The data of a new ticket's `routed` audit event (its group is already set)."""
    return {
        "group": ticket.group, "priority": ticket.priority, "tags": ticket.tags,
        # Hits with what they did; misses are only counted (`rules explain` shows them).
        "trail": [
            {"rule": e.rule, "source": e.source, "detail": e.detail, "effect": e.effect}
            for e in decision.trail if e.matched
        ],
        "evaluated": len(decision.trail),
        "default": decision.group is None,
    }


def _with_fallback_sender(mail: ParsedMail, inbound: Inbound) -> ParsedMail:
    """No usable From: Reply-To, then the envelope sender, stand in for the customer."""
    if mail.reply_to:
        return dataclasses.replace(mail, sender=mail.reply_to[0])
    if inbound.mail_from:
        return dataclasses.replace(mail, sender=Address(inbound.mail_from.lower()))
    raise StageError("normalise", "no-sender",
                     "no usable From, Reply-To or envelope sender: nobody to answer")


def open_ticket(
    session: Session,
    now: dt.datetime,
    decision: Decision,
    *,
    subject: str,
    group: str,
    customer: str,
    customer_name: str,
    channel: str,
    inbound_address: str,
    linked: Ticket | None = None,
    channel_ref: dict[str, Any] | None = None,
) -> Ticket:
    """A new ticket as B5 has it (state new, no owner, what routing decided), numbered
    and added, not flushed: rows that belong to it refer to it by relationship
    (`ticket=`), so its id is only needed when the batch flushes. Every channel opens
    tickets here.
    """
    ticket = Ticket(
        number=next_ticket_number(session, now),
        subject=subject,
        state="new",
        priority=decision.priority or "normal",
        type=decision.type,
        tags=list(decision.tags),
        group=group,
        owner=None,
        customer=customer,
        customer_name=customer_name,
        channel=channel,
        inbound_address=inbound_address,
        channel_ref=channel_ref,
        linked_ticket_id=linked.id if linked is not None else None,
        created_at=now,
        updated_at=now,
        escalation_level=0,
    )
    session.add(ticket)
    return ticket


def next_ticket_number(session: Session, now: dt.datetime) -> str:
    """Date-based, human-readable and unique: YYYYMMDD + a 5-digit daily sequence.

    The counter row is bumped with UPDATE ... RETURNING, so concurrent daemons on
    PostgreSQL serialise on that one row instead of racing on MAX(number). It runs on
    the session's connection (same transaction) without an autoflush: it reads no
    row of the session's.
    """
    day = now.astimezone(dt.UTC).strftime("%Y%m%d")
    name = f"ticket:{day}"
    pending = pending_of(session)

    def bump() -> int | None:
        value: int | None = session.connection().scalar(_BUMP_COUNTER, {"counter": name})
        return value

    for _ in range(3):
        # In the intake's fast path the counter is bumped once per batch and counted
        # on in memory (gateway.store.pending), then written back before the commit.
        value = bump() if pending is None else pending.next_value(name, bump)
        if value is not None:
            return f"{day}{value:05d}"
        try:
            with session.begin_nested():
                session.add(Counter(name=name, value=1))
            if pending is not None:
                pending.stored_counter(name, 1)
            return f"{day}{1:05d}"
        except IntegrityError:
            continue  # another daemon created the row first; bump it instead
    raise RuntimeError("could not allocate a ticket number")


def quarantine(
    session: Session, inbound: Inbound, error: StageError, now: dt.datetime,
    message_id: str | None = None,
) -> QuarantineRow:
    row = QuarantineRow(
        received_at=now,
        channel=inbound.channel.value,
        source=inbound.source,
        stage=error.stage,
        reason=error.reason,
        detail=error.detail,
        message_id=message_id,
        mail_from=inbound.mail_from,
        rcpt_tos=list(inbound.rcpt_tos),
        channel_message_id=inbound.channel_message_id,
        raw=inbound.raw,
        state="held",
    )
    session.add(row)
    session.flush()
    return row
