"""The SLA engine: keeps each ticket's deadlines current and fires what falls due.

Two halves share one object:

* **Observer** (`SlaEngine.ticket_changed`, a `pipeline.TicketObserver`): told of
  every ticket change inside the transaction that makes it, it updates the clock
  state (origin, pauses, unanswered customer message, ...), recomputes the
  deadlines with `gateway.escalation.sla` and stores them on the ticket row:
  ``first_response_due``, ``update_due``, ``solution_due`` and
  ``next_escalation_at``, the earliest alarm still to fire (indexed).
* **Firing** (`SlaEngine.fire_due`, run off the event loop by the scheduler):
  claims the tickets whose ``next_escalation_at`` has passed -- ``FOR UPDATE SKIP
  LOCKED`` on PostgreSQL, so two daemons never take the same ticket; SQLite's
  ``BEGIN IMMEDIATE`` serialises writers anyway -- and, in that transaction,
  writes the audit events, the outbox rows and the ticket changes, marks each
  alarm fired for its cycle and stores the next one. A crash before the commit
  fires it again after a restart; a commit makes it fired for every daemon.

What firing does (documented in ``docs/escalation.md``):

* warning -> mail to the owner, else the group's agents (else its leads);
* breach -> mail to the group's leads (else its agents), escalation level + 1,
  and per group configuration a move to ``escalate_to`` (whose agents are told)
  and/or a priority one step up;
* waiting for the customer -> reminders to the customer, then closing unsolved;
* ``#pending <time>`` -> a reminder to the owner (else the group) at that time.

Mail about escalation waits for the receiving group's business hours (the outbox
row's ``next_attempt_at``) unless the group says ``escalation_mail_anytime``;
mail to the customer and to the major-incident list goes at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from gateway.config import GroupSettings, Settings
from gateway.escalation.calendar import Calendar, next_business_moment
from gateway.escalation.settings import PRIORITIES, SLA_TAG_PREFIX
from gateway.escalation.sla import (
    CLOCK_TITLES,
    PAUSED_STATES,
    Alarm,
    Facts,
    Pause,
    Policy,
    Schedule,
    WaitingPolicy,
    compute,
    parse_target,
)
from gateway.notify import Notifier
from gateway.store.models import Article, Event, IncidentReview, Ticket
from gateway.store.pending import add_event, flush

log = logging.getLogger(__name__)

ACTOR: Final = "sla"
#: A ticket whose firing raised is tried again this much later (not in a hot loop).
RETRY_AFTER: Final = dt.timedelta(minutes=5)
#: Columns the observer re-reads under a row lock on PostgreSQL, so that what another
#: daemon's firing committed meanwhile (fired alarms, a move) is not overwritten.
_SLA_COLUMNS: Final = (
    "group", "priority", "escalation_level", "sla_name", "sla_started_at", "sla_pauses",
    "sla_fired", "unanswered_since", "last_agent_reply_at", "pending_until", "major_at",
)


@dataclass(slots=True)
class FireStats:
    """What one firing pass did (the scheduler logs it; tests and the bench read it)."""

    tickets: int = 0
    warnings: int = 0
    breaches: int = 0
    escalations: int = 0
    reminders: int = 0
    closed: int = 0
    pending_reminders: int = 0
    mails: int = 0
    errors: int = 0

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


# --- the ticket row <-> pure facts -------------------------------------------------------


def load_pauses(raw: Iterable[Iterable[str | None]] | None) -> list[Pause]:
    pauses: list[Pause] = []
    for item in raw or ():
        start, end = list(item)
        if start is None:
            continue
        pauses.append(Pause(dt.datetime.fromisoformat(start),
                            dt.datetime.fromisoformat(end) if end else None))
    return pauses


def dump_pauses(pauses: Iterable[Pause]) -> list[list[str | None]]:
    return [[p.start.isoformat(), p.end.isoformat() if p.end else None] for p in pauses]


def facts_of(ticket: Ticket) -> Facts:
    """The pure snapshot of a ticket's row the SLA clocks work on."""
    return Facts(
        origin=ticket.sla_started_at or ticket.created_at,
        state=ticket.state,
        first_response_at=ticket.first_response_at,
        unanswered_since=ticket.unanswered_since,
        last_agent_reply_at=ticket.last_agent_reply_at,
        pauses=tuple(load_pauses(ticket.sla_pauses)),
        pending_until=ticket.pending_until,
    )


def _state_before(ticket: Ticket) -> str | None:
    """The state a ticket had before its pending change (since its last flush).

    The observer is told "state" also when a command sets the state it already has
    (`#close` on a closed ticket). The attribute history says what it was: deleted
    holds the old value, unchanged the value set again. None when unknown (a ticket
    not yet in the database).
    """
    history = inspect(ticket).attrs.state.history
    if history.deleted:
        return str(history.deleted[0])
    if history.unchanged:
        return str(history.unchanged[0])
    return None


def local_time(instant: dt.datetime | None, cal: Calendar | None) -> str:
    """An instant as people of the calendar's zone read it (UTC without a calendar)."""
    if instant is None:
        return "-"
    zone = cal.tz if cal is not None else dt.UTC
    return instant.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")


class SlaEngine:
    """Deadlines on every ticket change; firing of what fell due. One per App."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        notifier: Notifier,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.notifier = notifier
        self.hooks = notifier.hooks
        # Compiled once: calendars memoise their days and holiday tables.
        self.calendars: dict[str, Calendar] = {
            name: Calendar.from_settings(cal) for name, cal in settings.calendars.items()
        }
        self._policies: dict[tuple[str, str], Policy] = {}
        self._earliest_lock = threading.Lock()
        self._earliest: dt.datetime | None = None
        # Set on the thread running fire_due: its writes are not offered to the timer
        # (the scheduler re-arms from the database after every pass anyway).
        self._firing = threading.local()

    # -- configuration lookups ---------------------------------------------------------

    def _group(self, name: str) -> GroupSettings | None:
        return self.settings.group(name)

    def _calendar_name_for(self, group: GroupSettings | None, sla: str | None) -> str | None:
        table = self.settings.sla.get(sla) if sla is not None else None
        if table is not None and table.calendar is not None:
            return table.calendar
        if group is not None and group.calendar is not None:
            return group.calendar
        return self.settings.escalation.default_calendar

    def group_calendar(self, name: str) -> tuple[str, Calendar] | None:
        """The business hours a group works in: its own, its SLA's, or the default."""
        group = self._group(name)
        sla = group.sla if group is not None else None
        if group is not None and group.calendar is not None:
            cal_name: str | None = group.calendar
        else:
            cal_name = self._calendar_name_for(group, sla or self.settings.escalation.default_sla)
        if cal_name is None:
            return None
        return cal_name, self.calendars[cal_name]

    def zone_for(self, group: str) -> dt.tzinfo:
        """The time zone the group works in (`Notifier.zone_for`); UTC without a calendar."""
        found = self.group_calendar(group)
        return found[1].tz if found is not None else dt.UTC

    def policy(self, sla: str, calendar: str) -> Policy:
        key = (sla, calendar)
        found = self._policies.get(key)
        if found is None:
            table = self.settings.sla[sla]
            found = self._policies[key] = Policy(
                name=sla,
                calendar_name=calendar,
                calendar=self.calendars[calendar],
                targets={clock: parse_target(text) for clock, text in table.targets().items()},
                warning_share=table.warning_share,
            )
        return found

    def policy_for(self, ticket: Ticket) -> tuple[Policy | None, str]:
        """The SLA in force for a ticket, and why (shown by `sla explain`)."""
        group = self._group(ticket.group)
        name: str | None = None
        major = self.settings.major_incidents
        if ticket.major_at is not None and major.sla is not None:
            name, why = major.sla, "major incident"
        else:
            tagged = [t[len(SLA_TAG_PREFIX):] for t in (ticket.tags or [])
                      if t.startswith(SLA_TAG_PREFIX)]
            known = [t for t in tagged if t in self.settings.sla]
            if known:
                name, why = known[0], f"routing rule tag {SLA_TAG_PREFIX}{known[0]}"
            elif group is not None and ticket.priority in group.sla_by_priority:
                name = group.sla_by_priority[ticket.priority]
                why = f"group {group.name}, priority {ticket.priority}"
            elif group is not None and group.sla is not None:
                name, why = group.sla, f"group {group.name}"
            elif self.settings.escalation.default_sla is not None:
                name, why = self.settings.escalation.default_sla, "escalation.default_sla"
            else:
                return None, f"no SLA for group {ticket.group}"
        calendar = self._calendar_name_for(group, name)
        if calendar is None:
            return None, f"SLA {name} has no calendar for group {ticket.group}"
        return self.policy(name, calendar), why

    def waiting_policy(self, ticket: Ticket) -> WaitingPolicy | None:
        group = self._group(ticket.group)
        found = self.group_calendar(ticket.group)
        if group is None or found is None:
            return None
        return WaitingPolicy(found[1], group.waiting_reminder_days,
                             group.waiting_second_reminder_days, group.waiting_close_days)

    def schedule(self, ticket: Ticket, now: dt.datetime) -> Schedule:
        """The ticket's clocks and unfired alarms as of `now` (pure; stores nothing)."""
        policy, _ = self.policy_for(ticket)
        return compute(facts_of(ticket), policy, now, waiting=self.waiting_policy(ticket),
                       fired=ticket.sla_fired or {})

    # -- observer ----------------------------------------------------------------------

    def ticket_changed(
        self, session: Session, ticket: Ticket, change: str, now: dt.datetime
    ) -> None:
        """`pipeline.TicketObserver`: update the clock state, recompute, store.

        A failure here (a bug, a calendar with no business hours left) must not send
        the customer's mail to quarantine: the SLA work is undone on its own
        savepoint, logged, and recorded on the ticket as an ``sla-error`` event; the
        ticket keeps its previous deadlines until the next change recomputes them.
        """
        # Read before the flush below, which forgets it: `#close` on a closed ticket is
        # reported as a state change too, and must not write a second incident review.
        before = _state_before(ticket) if change == "state" else None
        try:
            if change == "created" and self.settings.major_incidents.tag not in (
                    ticket.tags or []):
                # The hot path of every new ticket: only attribute writes and an event,
                # no SQL that could fail half-way, so no flush and no savepoint (they
                # cost more than the whole computation).
                self._changed(session, ticket, change, now, before)
                return
            # Flushed first (the rows the intake defers too), so that undoing the
            # savepoint cannot undo the pipeline's work.
            flush(session)
            with session.begin_nested():
                self._changed(session, ticket, change, now, before)
        except Exception as exc:
            log.exception("sla: ticket %s: deadlines not updated after %s", ticket.number,
                          change)
            add_event(session, ticket, at=now, actor=ACTOR, kind="sla-error",
                      data={"change": change, "error": f"{type(exc).__name__}: {exc}"})

    def _changed(self, session: Session, ticket: Ticket, change: str, now: dt.datetime,
                 before: str | None = None) -> None:
        if change != "created":
            self._lock(session, ticket)
        if change == "created":
            ticket.sla_started_at = ticket.created_at
            ticket.sla_pauses = []
            ticket.sla_fired = {}
            ticket.unanswered_since = ticket.created_at
            if self.settings.major_incidents.tag in (ticket.tags or []):
                self.declare_major(session, ticket, now,
                                   why=f"routing rule tag {self.settings.major_incidents.tag}")
        elif change == "customer-message":
            if ticket.unanswered_since is None:
                ticket.unanswered_since = now
        elif change == "agent-reply":
            ticket.last_agent_reply_at = now
            ticket.unanswered_since = None
        elif change == "state":
            self._state_changed(session, ticket, now, before)
        elif change == "group":
            self._entered_group(ticket, now)
        elif change == "major":
            self.declare_major(session, ticket, now, why="#major command")
        self.store(session, ticket, now)

    def _lock(self, session: Session, ticket: Ticket) -> None:
        """PostgreSQL: lock the row and re-read what a peer's firing may have changed."""
        bind = session.get_bind()
        if bind.dialect.name != "postgresql" or ticket.id is None:
            return
        # Our own changes are flushed (ticket_changed), so the refresh loses none of them;
        # the row lock waits for a peer's firing transaction holding the row.
        session.flush()
        session.refresh(ticket, attribute_names=_SLA_COLUMNS, with_for_update=True)

    def _state_changed(self, session: Session, ticket: Ticket, now: dt.datetime,
                       before: str | None) -> None:
        """Pause or resume the clocks; a major incident closing gets its review record.

        `before` is the state the ticket left (None when unknown: then it counts as a
        change). Only a change *into* closed writes a review, so `#close` on a closed
        incident does not write a second one; closing it again after a reopen does.
        """
        pauses = load_pauses(ticket.sla_pauses)
        paused = bool(pauses) and pauses[-1].end is None
        if ticket.state in PAUSED_STATES and not paused:
            pauses.append(Pause(now))
        elif ticket.state not in PAUSED_STATES and paused:
            pauses[-1] = Pause(pauses[-1].start, now)
        elif paused and before in PAUSED_STATES and before != ticket.state:
            # Closed and set pending (or the other way): the clocks stay paused, but a
            # wait for the customer starts now, not when the ticket was closed days ago
            # (its first reminder would be overdue at once). Two pauses that meet: not
            # a business minute between them.
            pauses[-1] = Pause(pauses[-1].start, now)
            pauses.append(Pause(now))
        ticket.sla_pauses = dump_pauses(pauses)
        if ticket.state != "pending":
            ticket.pending_until = None
        if ticket.state == "closed" and before != "closed" and ticket.major_at is not None:
            self.write_review(session, ticket, now)

    def _entered_group(self, ticket: Ticket, now: dt.datetime) -> None:
        """The new group's clocks start now (see gateway.escalation.sla, "Origin")."""
        ticket.sla_started_at = now
        paused = ticket.state in PAUSED_STATES
        ticket.sla_pauses = dump_pauses([Pause(now)] if paused else [])

    def store(self, session: Session, ticket: Ticket, now: dt.datetime) -> Schedule:
        """Recompute the ticket's deadlines and write them to its row."""
        policy, why = self.policy_for(ticket)
        sched = compute(facts_of(ticket), policy, now, waiting=self.waiting_policy(ticket),
                        fired=ticket.sla_fired or {})
        name = policy.name if policy is not None else None
        if name != ticket.sla_name:
            add_event(session, ticket, at=now, actor=ACTOR, kind="sla", data={
                "from": ticket.sla_name, "to": name, "why": why,
                "calendar": policy.calendar_name if policy is not None else None,
            })
            ticket.sla_name = name
        ticket.first_response_due = sched.due("first_response")
        ticket.update_due = sched.due("update")
        ticket.solution_due = sched.due("solution")
        ticket.next_escalation_at = sched.next_at
        fired = dict(sched.fired)
        if fired != (ticket.sla_fired or {}):
            ticket.sla_fired = fired
        self._note(sched.next_at)
        return sched

    # -- what the scheduler needs ------------------------------------------------------

    def _note(self, at: dt.datetime | None) -> None:
        if at is None or getattr(self._firing, "active", False):
            return
        with self._earliest_lock:
            if self._earliest is None or at < self._earliest:
                self._earliest = at

    def take_earliest(self) -> dt.datetime | None:
        """The earliest alarm written since the last call (thread-safe; may be stale)."""
        with self._earliest_lock:
            earliest, self._earliest = self._earliest, None
        return earliest

    def next_due(self) -> dt.datetime | None:
        """The earliest alarm of any ticket in the database (one index lookup)."""
        with self.sessions() as session:
            return session.scalar(select(func.min(Ticket.next_escalation_at)))

    # -- firing --------------------------------------------------------------------------

    def fire_due(self, now: dt.datetime, *, stop: threading.Event | None = None) -> FireStats:
        """Claim and fire every ticket whose next alarm is at or before `now`.

        One transaction per batch; a ticket another daemon holds is skipped (it is
        firing it). `stop` ends the pass between batches (daemon shutdown); what is
        left stays due for the next pass or the next daemon. Returns what was done.
        """
        stats = FireStats()
        batch = self.settings.escalation.batch_size
        self._firing.active = True
        try:
            return self._fire_batches(now, batch, stats, stop)
        finally:
            self._firing.active = False

    def _fire_batches(self, now: dt.datetime, batch: int, stats: FireStats,
                      stop: threading.Event | None) -> FireStats:
        while True:
            with self.sessions() as session, session.begin():
                query = (
                    select(Ticket)
                    .where(Ticket.next_escalation_at <= now)
                    .order_by(Ticket.next_escalation_at, Ticket.id)
                    .limit(batch)
                )
                if session.get_bind().dialect.name == "postgresql":
                    query = query.with_for_update(skip_locked=True)
                tickets = list(session.scalars(query))
                for ticket in tickets:
                    self._fire_one(session, ticket, now, stats)
            if len(tickets) < batch or (stop is not None and stop.is_set()):
                return stats

    def _fire_one(
        self, session: Session, ticket: Ticket, now: dt.datetime, stats: FireStats
    ) -> None:
        number = ticket.number
        try:
            with session.begin_nested():
                self._fire_ticket(session, ticket, now, stats)
        except Exception:
            # A bug in one ticket must not stop the others, nor spin: try it later.
            log.exception("sla: ticket %s: firing failed; retrying in %s", number, RETRY_AFTER)
            stats.errors += 1
            ticket.next_escalation_at = now + RETRY_AFTER
            return
        stats.tickets += 1
        if ticket.next_escalation_at is not None and ticket.next_escalation_at <= now:
            log.error("sla: ticket %s: next alarm %s is not after now; deferring", number,
                      ticket.next_escalation_at.isoformat())
            ticket.next_escalation_at = now + dt.timedelta(minutes=1)

    def _fire_ticket(
        self, session: Session, ticket: Ticket, now: dt.datetime, stats: FireStats
    ) -> None:
        sched = self.schedule(ticket, now)
        due = [alarm for alarm in sched.alarms if alarm.at <= now]
        fired = dict(sched.fired)
        breach_clocks = {a.clock for a in due if a.kind == "breach"}
        # After downtime several waiting steps may be due at once: only the last one acts
        # (no reminder just before closing, no first reminder right before the second).
        waiting = [a for a in due if a.kind in ("reminder", "close")]
        breaches: list[Alarm] = []
        for alarm in due:
            fired[alarm.key] = alarm.cycle
            if alarm.kind == "warning":
                if alarm.clock in breach_clocks:
                    continue  # its breach fires in this pass: a late warning warns nobody
                self._warn(session, ticket, sched, alarm, now, stats)
            elif alarm.kind == "breach":
                breaches.append(alarm)
            elif alarm.kind == "reminder":
                if alarm is not waiting[-1]:
                    continue
                self._remind_customer(session, ticket, sched, alarm, now, stats)
            elif alarm.kind == "close":
                self._close_unsolved(session, ticket, alarm, now, stats)
            elif alarm.kind == "pending":
                self._remind_owner(session, ticket, alarm, now, stats)
        ticket.sla_fired = fired
        if breaches:
            self._breach(session, ticket, sched, breaches, now, stats)
        self.store(session, ticket, now)

    # -- the actions ----------------------------------------------------------------------

    def _hold(self, group: str, now: dt.datetime,
              fallback: Calendar | None = None) -> dt.datetime | None:
        """No midnight pages: the next business moment of the receiving group.

        A group that names no calendar (nor an SLA with one) works the hours of the
        SLA that fired, `fallback`.
        """
        settings = self._group(group)
        if settings is not None and settings.escalation_mail_anytime:
            return None
        found = self.group_calendar(group)
        cal = found[1] if found is not None else fallback
        return next_business_moment(cal, now) if cal is not None else None

    def _staff(self, ticket: Ticket, *, leads_first: bool) -> list[str]:
        """Leads (for breaches) or owner/agents (for warnings), each falling back on the other."""
        group = self._group(ticket.group)
        leads = list(group.leads) if group is not None else []
        workers = [ticket.owner] if ticket.owner else self.notifier.agents_and_owner(ticket)
        if leads_first:
            return leads or self.notifier.agents_and_owner(ticket)
        return workers or leads

    def _calendar_of(self, sched: Schedule, ticket: Ticket) -> Calendar | None:
        if sched.policy is not None:
            return sched.policy.calendar
        found = self.group_calendar(ticket.group)
        return found[1] if found is not None else None

    def _warn(self, session: Session, ticket: Ticket, sched: Schedule, alarm: Alarm,
              now: dt.datetime, stats: FireStats) -> None:
        assert sched.policy is not None and alarm.clock is not None
        report = sched.clock(alarm.clock)
        assert report is not None and report.due is not None
        recipients = self._staff(ticket, leads_first=False)
        group = self._group(ticket.group)
        escalation = "level " + str(ticket.escalation_level + 1)
        if group is not None and group.breach_move and group.escalate_to:
            escalation += f", moved to {group.escalate_to}"
        hold = self._hold(ticket.group, now, sched.policy.calendar)
        rows = self.notifier.sla_mail(
            session, ticket, "sla_warning.txt", recipients, kind="escalation",
            subject_prefix="SLA warning: ", now=now, not_before=hold,
            clock=CLOCK_TITLES[alarm.clock], due=local_time(report.due, sched.policy.calendar),
            sla=sched.policy.name, target=str(report.target), target_minutes=report.target_minutes,
            used=report.used_minutes, calendar=sched.policy.calendar_name, escalation=escalation,
        )
        add_event(session, ticket, at=now, actor=ACTOR, kind="sla-warning", data={
            "clock": alarm.clock, "sla": sched.policy.name, "warn_at": alarm.at.isoformat(),
            "due": report.due.isoformat(), "to": recipients,
            "held_until": hold.isoformat() if hold is not None and hold > now else None,
        })
        stats.warnings += 1
        stats.mails += len(rows)
        log.info("sla: ticket %s: %s warning (due %s) to %s", ticket.number, alarm.clock,
                 report.due.isoformat(), ", ".join(recipients) or "nobody")

    def _breach(self, session: Session, ticket: Ticket, sched: Schedule, breaches: list[Alarm],
                now: dt.datetime, stats: FireStats) -> None:
        assert sched.policy is not None
        policy = sched.policy
        group_name = ticket.group
        group = self._group(group_name)
        ticket.escalation_level = (ticket.escalation_level or 0) + 1
        level = ticket.escalation_level
        clocks: list[dict[str, Any]] = []
        for alarm in breaches:
            assert alarm.clock is not None
            report = sched.clock(alarm.clock)
            assert report is not None
            clocks.append({"clock": CLOCK_TITLES[alarm.clock], "name": alarm.clock,
                           "due": local_time(alarm.at, policy.calendar),
                           "target": str(report.target), "sla": policy.name})
            add_event(session, ticket, at=now, actor=ACTOR, kind="sla-breach", data={
                "clock": alarm.clock, "sla": policy.name, "due": alarm.at.isoformat(),
                "group": group_name, "level": level,
            })
        stats.breaches += len(breaches)
        moved_to = None
        if group is not None and group.breach_move and group.escalate_to:
            moved_to = group.escalate_to
        priority_from = ticket.priority
        priority_to = None
        if group is not None and group.breach_raise_priority and priority_from in PRIORITIES:
            index = PRIORITIES.index(priority_from)
            if index + 1 < len(PRIORITIES):
                priority_to = PRIORITIES[index + 1]
        leads = self._staff(ticket, leads_first=True)
        hold = self._hold(group_name, now, policy.calendar)
        rows = self.notifier.sla_mail(
            session, ticket, "sla_breach.txt", leads, kind="escalation",
            subject_prefix="SLA breach: ", now=now, not_before=hold, clocks=clocks, level=level,
            group=group_name, moved_to=moved_to, priority_from=priority_from,
            priority_to=priority_to,
        )
        stats.mails += len(rows)
        if priority_to is not None:
            ticket.priority = priority_to
        add_event(session, ticket, at=now, actor=ACTOR, kind="escalated", data={
            "level": level, "clocks": [c["name"] for c in clocks], "from_group": group_name,
            "to_group": moved_to, "from_priority": priority_from, "to_priority": priority_to,
            "leads": leads, "held_until": hold.isoformat() if hold is not None and hold > now
            else None,
        })
        stats.escalations += 1
        log.warning("sla: ticket %s breached %s in %s: level %d%s%s", ticket.number,
                    ", ".join(c["name"] for c in clocks), group_name, level,
                    f", moved to {moved_to}" if moved_to else "",
                    f", priority {priority_to}" if priority_to else "")
        if moved_to is not None:
            ticket.group = moved_to
            self._entered_group(ticket, now)
            after = self.store(session, ticket, now)
            new_cal = self._calendar_of(after, ticket)
            deadlines = [{"clock": CLOCK_TITLES[c.clock], "due": local_time(c.due, new_cal)}
                         for c in after.clocks if c.due is not None]
            rows = self.notifier.sla_mail(
                session, ticket, "sla_escalated.txt", self.notifier.agents_and_owner(ticket),
                kind="escalation", subject_prefix="Escalated: ", now=now,
                not_before=self._hold(moved_to, now, new_cal), level=level,
                from_group=group_name,
                clocks=clocks, deadlines=deadlines,
                sla=after.policy.name if after.policy is not None else "-",
                text=self._last_customer_text(session, ticket),
            )
            stats.mails += len(rows)

    def _remind_customer(self, session: Session, ticket: Ticket, sched: Schedule, alarm: Alarm,
                         now: dt.datetime, stats: FireStats) -> None:
        step = 1 if alarm.key.endswith("1") else 2
        close = next((a for a in sched.alarms if a.kind == "close"), None)
        cal = self._calendar_of(sched, ticket)
        rows = self.notifier.sla_mail(
            session, ticket, "sla_reminder.txt", [ticket.customer], kind="reminder",
            subject_prefix="Reminder: ", now=now, to_customer=True, step=step,
            close_at=local_time(close.at, cal) if close is not None else None,
        )
        add_event(session, ticket, at=now, actor=ACTOR, kind="reminder", data={
            "step": step, "to": ticket.customer, "waiting_since": alarm.cycle,
            "sent": bool(rows),
        })
        stats.reminders += 1
        stats.mails += len(rows)
        log.info("sla: ticket %s: reminder %d to the customer", ticket.number, step)

    def _close_unsolved(self, session: Session, ticket: Ticket, alarm: Alarm,
                        now: dt.datetime, stats: FireStats) -> None:
        since = dt.datetime.fromisoformat(alarm.cycle)
        add_event(session, ticket, at=now, actor=ACTOR, kind="state", data={
            "from": ticket.state, "to": "closed", "why": "no answer from the customer"})
        add_event(session, ticket, at=now, actor=ACTOR, kind="closed-unsolved",
                  data={"waiting_since": alarm.cycle})
        before = ticket.state
        ticket.state = "closed"
        ticket.closed_at = now
        ticket.updated_at = now
        found = self.group_calendar(ticket.group)
        rows = self.notifier.sla_mail(
            session, ticket, "sla_closed.txt", [ticket.customer], kind="reminder",
            subject_prefix="Closed: ", now=now, to_customer=True,
            since=local_time(since, found[1] if found else None),
        )
        self._state_changed(session, ticket, now, before)
        stats.closed += 1
        stats.mails += len(rows)
        log.info("sla: ticket %s closed unsolved (waiting since %s)", ticket.number, alarm.cycle)

    def _remind_owner(self, session: Session, ticket: Ticket, alarm: Alarm, now: dt.datetime,
                      stats: FireStats) -> None:
        recipients = self._staff(ticket, leads_first=False)
        found = self.group_calendar(ticket.group)
        rows = self.notifier.sla_mail(
            session, ticket, "pending_reminder.txt", recipients, kind="reminder",
            subject_prefix="Pending reminder: ", now=now,
            until=local_time(alarm.at, found[1] if found else None),
        )
        add_event(session, ticket, at=now, actor=ACTOR, kind="pending-reminder",
                  data={"until": alarm.at.isoformat(), "to": recipients})
        stats.pending_reminders += 1
        stats.mails += len(rows)
        log.info("sla: ticket %s: pending reminder to %s", ticket.number, ", ".join(recipients))

    # -- major incidents -------------------------------------------------------------------

    def declare_major(self, session: Session, ticket: Ticket, now: dt.datetime, *,
                      why: str) -> bool:
        """Mark a major incident: its own SLA, and the incident list told at once.

        False when it already was one (a second `#major` changes nothing).
        """
        if ticket.major_at is not None:
            return False
        ticket.major_at = now
        major = self.settings.major_incidents
        sched = self.store(session, ticket, now)
        cal = self._calendar_of(sched, ticket)
        deadlines = [{"clock": CLOCK_TITLES[c.clock], "due": local_time(c.due, cal)}
                     for c in sched.clocks if c.due is not None]
        rows = self.notifier.sla_mail(
            session, ticket, "major_incident.txt", major.notify, kind="incident",
            subject_prefix="MAJOR INCIDENT: ", now=now, why=why,
            declared=local_time(now, cal), deadlines=deadlines,
            sla=sched.policy.name if sched.policy is not None else "-",
            text=self._last_customer_text(session, ticket),
        )
        add_event(session, ticket, at=now, actor=ACTOR, kind="major-incident", data={
            "why": why, "sla": ticket.sla_name, "notified": list(major.notify)})
        log.warning("sla: ticket %s declared a major incident (%s); %d mail(s)",
                    ticket.number, why, len(rows))
        return True

    def write_review(self, session: Session, ticket: Ticket, now: dt.datetime) -> IncidentReview:
        """The review record of a closing major incident: every event and article, in order."""
        assert ticket.major_at is not None
        session.flush()
        events = session.scalars(
            select(Event).where(Event.ticket_id == ticket.id).order_by(Event.at, Event.id))
        articles = session.execute(
            select(Article.id, Article.created_at, Article.direction, Article.kind,
                   Article.author_role, Article.sender, Article.subject, Article.body)
            .where(Article.ticket_id == ticket.id).order_by(Article.created_at, Article.id))
        timeline: list[dict[str, Any]] = [
            {"at": e.at.isoformat(), "type": "event", "actor": e.actor, "kind": e.kind,
             "data": e.data} for e in events
        ]
        timeline += [
            {"at": a.created_at.isoformat(), "type": "article", "id": a.id,
             "actor": a.sender, "kind": f"{a.kind} {a.direction} ({a.author_role})",
             "data": {"subject": a.subject, "excerpt": (a.body or "")[:500]}}
            for a in articles
        ]
        timeline.sort(key=lambda item: (item["at"], item["type"] != "article"))
        kinds = [item["kind"] for item in timeline if item["type"] == "event"]
        summary = {
            "number": ticket.number, "subject": ticket.subject, "group": ticket.group,
            "priority": ticket.priority, "customer": ticket.customer,
            "major_at": ticket.major_at.isoformat(), "closed_at": now.isoformat(),
            "minutes_open": int((now - ticket.major_at).total_seconds() // 60),
            "sla": ticket.sla_name, "escalation_level": ticket.escalation_level,
            "warnings": kinds.count("sla-warning"), "breaches": kinds.count("sla-breach"),
        }
        review = IncidentReview(ticket_id=ticket.id, major_at=ticket.major_at, closed_at=now,
                                summary=summary, timeline=timeline)
        session.add(review)
        session.flush()
        add_event(session, ticket, at=now, actor=ACTOR, kind="incident-review",
                  data={"review": review.id, "entries": len(timeline)})
        log.info("sla: ticket %s: incident review #%d written (%d entries)", ticket.number,
                 review.id, len(timeline))
        return review

    def _last_customer_text(self, session: Session, ticket: Ticket) -> str:
        body = session.scalar(
            select(Article.body).where(Article.ticket_id == ticket.id,
                                       Article.author_role == "customer")
            .order_by(Article.id.desc()).limit(1))
        return (body or "").strip()


def counts_by_kind(session: Session, kinds: Iterable[str],
                   since: dt.datetime | None = None) -> Mapping[str, int]:
    """Audit events per kind (the SLA metrics are these counts)."""
    query = select(Event.kind, func.count(Event.id)).where(Event.kind.in_(list(kinds)))
    if since is not None:
        query = query.where(Event.at >= since)
    return {kind: int(n) for kind, n in session.execute(query.group_by(Event.kind))}
