"""SLA clocks: a ticket's targets and history -> its deadlines, warnings and reminders.

This module's sole purpose is to answer, for one ticket at one instant, *when*
each SLA clock falls due and which alarms (warning, breach, reminder, close) are
still to fire. It is pure: it reads `Facts` (a snapshot of the ticket), a
`Policy` (the ``[sla.<name>]`` targets over a compiled calendar), the waiting
rules and the set of alarms already fired, and returns a `Schedule`. The engine
stores the result on the ticket and acts on it; `helpdeskd sla explain` prints it.

The clocks (issue 6), all counted in business time of the policy's calendar:

* **first_response** -- from the clock origin to the first public agent reply.
* **update** -- from the oldest unanswered customer message, or, when none is
  unanswered, from the last public agent reply, to the next public agent reply.
  It starts once the ticket has had its first response (while a first-response
  target exists the first-response clock is the one that matters); without a
  first-response target it runs from the origin.
* **solution** -- from the clock origin to closing.

Documented choices (each pinned by a test in ``tests/escalation``):

* **Origin.** A ticket's clocks start when it enters its current group: at
  creation, and again whenever it moves (by ``#group`` or by escalation). Each
  group is measured against its own SLA (an OLA), so a ticket escalated from L1
  to L2 is not born breached at L2. Priority changes keep the origin and apply
  the new targets to the time already used.
* **Pauses.** ``pending`` (waiting for the customer, with or without a reminder
  time) and ``closed`` stop every clock; leaving them resumes it with the
  business minutes already used. A deadline is the instant at which the *unpaused*
  business minutes since the clock's start reach the target; while paused a clock
  has no deadline.
* **Working-day targets** fall on the same local wall time N working days later
  (`add_working_days`); if the ticket was paused inside that span, the target is
  converted into the business minutes it spanned and counted like a minute target,
  and a deadline that lands on the end of a business interval moves to the start of
  the next one (Tuesday 09:00 rather than Monday 17:00: no business time between).
* **Warnings** fire at ``warning_share`` of the target (rounded down to whole
  business minutes; 0 disables them). A warning whose breach is due at the same
  pass is skipped: a warning after the deadline warns nobody.
* **Cycles.** Every alarm belongs to a cycle, an ISO timestamp naming the clock's
  start (or the reminder time). An alarm has fired when the ticket's fired map
  holds its key with the same cycle; a new cycle (a new agent reply, a new group)
  arms the alarm again, and a recomputation within one cycle never re-fires it.
  Pausing (``pending``) or stopping (``closed``) a clock keeps its start, so its
  fired marks are kept too: reopening resumes the same cycle and a warning or
  breach that already fired stays fired. Likewise a wait for the customer keeps
  its fired reminders while the same pause lasts (through ``#pending <time>`` and
  back to ``#pending``); a change between ``closed`` and ``pending`` starts a new
  pause where the old one ends (the engine), so a closed ticket set pending waits
  from then.
* **Waiting for the customer** (``pending`` without a time): a first reminder
  after N working days, a second M working days later, closing as unsolved K
  working days after that, counted from the later of the pause start and the
  last public agent reply. A step of 0 days is skipped.
* **Pending until** (``#pending <time>``): one reminder to the owner at that time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal

from gateway.escalation.calendar import (
    Calendar,
    add_business_minutes,
    add_working_days,
    business_minutes_between,
    next_business_moment,
)

__all__ = [
    "CLOCKS",
    "MAX_TARGET_MINUTES",
    "MAX_TARGET_WORKING_DAYS",
    "PAUSED_STATES",
    "Alarm",
    "ClockReport",
    "Facts",
    "Pause",
    "Policy",
    "Schedule",
    "Target",
    "WaitingPolicy",
    "compute",
    "parse_target",
]

Clock = Literal["first_response", "update", "solution"]
CLOCKS: Final[tuple[Clock, ...]] = ("first_response", "update", "solution")
# States in which no SLA clock runs. "closed" stops them; reopening resumes them.
PAUSED_STATES: Final = frozenset({"pending", "closed"})

#: The alarm keys of a wait for the customer, in order.
WAITING_KEYS: Final = ("waiting:reminder1", "waiting:reminder2", "waiting:close")

CLOCK_TITLES: Final[Mapping[str, str]] = {
    "first_response": "first response",
    "update": "update",
    "solution": "solution",
}


# --- targets ---------------------------------------------------------------------------

_TARGET_RE: Final = re.compile(
    r"^\s*(\d+)\s*(m|min|mins|minutes?|h|hours?|wd|working[ _-]days?)?\s*$", re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class Target:
    """An amount of business time: whole business minutes or whole working days."""

    amount: int
    unit: Literal["minutes", "working_days"]

    def __str__(self) -> str:
        if self.unit == "working_days":
            return f"{self.amount} working day{'s' if self.amount != 1 else ''}"
        if self.amount % 60 == 0:
            hours = self.amount // 60
            return f"{hours} business hour{'s' if hours != 1 else ''}"
        return f"{self.amount} business minutes"

    @property
    def text(self) -> str:
        """The canonical configuration spelling: ``240m`` or ``3wd``."""
        return f"{self.amount}{'wd' if self.unit == 'working_days' else 'm'}"


#: The largest targets: a year around the clock (525,600 minutes = 8,760 hours) and a
#: year of five-day weeks. Every ticket change walks the calendar day by day up to its
#: deadlines, on the intake's thread; unbounded targets let a typo ("99999999wd")
#: stall intake for half a minute and end in OverflowError. No helpdesk agrees to more.
MAX_TARGET_MINUTES: Final = 365 * 24 * 60
MAX_TARGET_WORKING_DAYS: Final = 260


def parse_target(value: int | str) -> Target:
    """``240`` or ``"240m"`` (business minutes), ``"4h"`` (business hours), ``"3wd"``
    or ``"3 working days"``; ValueError otherwise. Zero and negative amounts are refused,
    as are more than `MAX_TARGET_MINUTES` minutes or `MAX_TARGET_WORKING_DAYS` working
    days."""
    if isinstance(value, bool):
        raise ValueError("expected business minutes (240), '4h' or '3wd', not a boolean")
    if isinstance(value, int):
        amount, unit = value, "m"
    else:
        match = _TARGET_RE.match(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a target: use business minutes (240 or '240m'),"
                " business hours ('4h') or working days ('3wd', '3 working days')"
            )
        amount, unit = int(match.group(1)), (match.group(2) or "m").lower()
    if amount <= 0:
        raise ValueError(f"a target must be at least 1, got {amount}")
    if unit.startswith("w"):
        if amount > MAX_TARGET_WORKING_DAYS:
            raise ValueError(f"a target must be at most {MAX_TARGET_WORKING_DAYS} working days"
                             f" (a year), got {amount}")
        return Target(amount, "working_days")
    minutes = amount * 60 if unit.startswith("h") else amount
    if minutes > MAX_TARGET_MINUTES:
        raise ValueError(f"a target must be at most {MAX_TARGET_MINUTES} business minutes"
                         f" ({MAX_TARGET_MINUTES // 60}h, a year around the clock),"
                         f" got {minutes}")
    return Target(minutes, "minutes")


# --- inputs ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pause:
    """A span in which the clocks stood still; ``end`` is None while it lasts."""

    start: datetime
    end: datetime | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """One ``[sla.<name>]`` table, compiled: targets over a calendar."""

    name: str
    calendar_name: str
    calendar: Calendar
    targets: Mapping[str, Target]
    warning_share: float = 0.75


@dataclass(frozen=True, slots=True)
class WaitingPolicy:
    """Reminders while waiting for the customer: working days per step, over a calendar."""

    calendar: Calendar
    reminder_days: int = 5
    second_reminder_days: int = 5
    close_days: int = 5


@dataclass(frozen=True, slots=True)
class Facts:
    """What the clocks need to know about a ticket (a snapshot of its row)."""

    #: When the ticket entered its current group: the clocks' common origin.
    origin: datetime
    state: str
    first_response_at: datetime | None = None
    #: The oldest customer message since the last public agent reply.
    unanswered_since: datetime | None = None
    last_agent_reply_at: datetime | None = None
    pauses: tuple[Pause, ...] = ()
    pending_until: datetime | None = None


# --- outputs ---------------------------------------------------------------------------

Status = Literal["running", "paused", "stopped", "met", "missed"]


@dataclass(frozen=True, slots=True)
class ClockReport:
    """One clock at one instant, with what went into its deadline."""

    clock: Clock
    target: Target
    #: The target in business minutes from `start` (working days converted).
    target_minutes: int
    start: datetime
    start_reason: str
    status: Status
    #: The open deadline; None when paused, stopped, met or missed.
    due: datetime | None
    warn_at: datetime | None
    #: Unpaused business minutes used from `start` to now (or to `ended_at`).
    used_minutes: int
    #: Business minutes inside pauses since `start`.
    paused_minutes: int
    #: When the clock stopped for good (first response given), else None.
    ended_at: datetime | None = None

    @property
    def cycle(self) -> str:
        return self.start.isoformat()

    @property
    def remaining_minutes(self) -> int:
        return self.target_minutes - self.used_minutes


AlarmKind = Literal["warning", "breach", "reminder", "close", "pending"]


@dataclass(frozen=True, slots=True, order=True)
class Alarm:
    """Something to do at an instant unless already done in this cycle."""

    at: datetime
    key: str
    cycle: str = field(compare=False)
    kind: AlarmKind = field(compare=False)
    clock: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Schedule:
    """Every clock of a ticket and the alarms that are still to fire."""

    policy: Policy | None
    clocks: tuple[ClockReport, ...]
    #: Unfired alarms, earliest first.
    alarms: tuple[Alarm, ...]
    #: Alarms that have fired in their current cycle (key -> cycle), pruned.
    fired: Mapping[str, str]

    def clock(self, name: str) -> ClockReport | None:
        return next((c for c in self.clocks if c.clock == name), None)

    def due(self, name: str) -> datetime | None:
        report = self.clock(name)
        return report.due if report is not None else None

    @property
    def next_at(self) -> datetime | None:
        return self.alarms[0].at if self.alarms else None


# --- arithmetic --------------------------------------------------------------------------


def _relevant_pauses(pauses: Iterable[Pause], start: datetime) -> list[Pause]:
    """Pauses that end after `start`, clipped to begin no earlier than it, in order."""
    kept = [
        Pause(max(p.start, start), p.end)
        for p in sorted(pauses, key=lambda p: p.start)
        if p.end is None or p.end > start
    ]
    return kept


def _consume(
    cal: Calendar, start: datetime, minutes: int, pauses: Sequence[Pause]
) -> datetime | None:
    """The instant at which `minutes` unpaused business minutes have passed since `start`.

    None when an open pause comes first: a paused clock has no deadline.
    """
    cursor, remaining = start, minutes
    for pause in pauses:
        if pause.end is not None and pause.end <= cursor:
            continue
        begin = max(pause.start, cursor)
        candidate = add_business_minutes(cal, cursor, remaining)
        if candidate <= begin:
            return candidate
        remaining -= business_minutes_between(cal, cursor, begin)
        if pause.end is None:
            return None
        cursor = pause.end
    return add_business_minutes(cal, cursor, remaining)


def _paused_minutes(cal: Calendar, pauses: Sequence[Pause], until: datetime) -> int:
    total = 0
    for pause in pauses:
        end = until if pause.end is None else min(pause.end, until)
        total += business_minutes_between(cal, pause.start, end)
    return total


def _clock(
    clock: Clock,
    policy: Policy,
    start: datetime,
    start_reason: str,
    pauses: Sequence[Pause],
    now: datetime,
    *,
    ended_at: datetime | None = None,
    stopped: bool = False,
) -> ClockReport:
    cal = policy.calendar
    target = policy.targets[clock]
    relevant = _relevant_pauses(pauses, start)
    until = ended_at if ended_at is not None else now
    if target.unit == "working_days":
        base = add_working_days(cal, start, target.amount)
        minutes = business_minutes_between(cal, start, base)
        interrupted = any(p.start < base for p in relevant)
        due = _consume(cal, start, minutes, relevant) if interrupted else base
        if interrupted and due is not None:
            # Counting minutes may end on an interval's end (Monday 17:00); a working-day
            # deadline reads as the next interval's start (Tuesday 09:00), the same
            # business minute, as it does without pauses.
            due = next_business_moment(cal, due)
    else:
        minutes = target.amount
        due = _consume(cal, start, minutes, relevant)
    warn_minutes = math.floor(minutes * policy.warning_share)
    warn_at = _consume(cal, start, warn_minutes, relevant) if warn_minutes > 0 else None
    paused = _paused_minutes(cal, relevant, until)
    used = max(0, business_minutes_between(cal, start, until) - paused)
    status: Status
    if ended_at is not None:
        status = "met" if due is not None and ended_at <= due else "missed"
        # `due` above counted pauses up to now; the verdict is about the reply instant.
        if due is None:
            status = "met" if used <= minutes else "missed"
        due = warn_at = None
    elif stopped:
        status, due, warn_at = "stopped", None, None
    elif due is None:
        status, warn_at = "paused", None
    else:
        status = "running"
    return ClockReport(
        clock=clock,
        target=target,
        target_minutes=minutes,
        start=start,
        start_reason=start_reason,
        status=status,
        due=due,
        warn_at=warn_at,
        used_minutes=used,
        paused_minutes=paused,
        ended_at=ended_at,
    )


def _update_start(facts: Facts) -> tuple[datetime, str]:
    if facts.unanswered_since is not None:
        start, reason = facts.unanswered_since, "oldest unanswered customer message"
    elif facts.last_agent_reply_at is not None:
        start, reason = facts.last_agent_reply_at, "last public agent reply"
    else:
        start, reason = facts.origin, "clock origin"
    if start < facts.origin:
        return facts.origin, f"{reason}, before the ticket entered its group: clock origin"
    return start, reason


def clock_reports(facts: Facts, policy: Policy, now: datetime) -> list[ClockReport]:
    """Every clock `policy` defines, as of `now`."""
    reports: list[ClockReport] = []
    closed = facts.state == "closed"
    origin_reason = "ticket entered its group"
    targets = policy.targets
    if "first_response" in targets:
        answered = facts.first_response_at
        if answered is not None and answered < facts.origin:
            # Answered before it moved here: the first response is history, not ours to time.
            pass
        else:
            reports.append(_clock("first_response", policy, facts.origin, origin_reason,
                                  facts.pauses, now, ended_at=answered,
                                  stopped=closed and answered is None))
    if "update" in targets and (
        facts.first_response_at is not None or "first_response" not in targets
    ):
        start, reason = _update_start(facts)
        reports.append(_clock("update", policy, start, reason, facts.pauses, now,
                              stopped=closed))
    if "solution" in targets:
        reports.append(_clock("solution", policy, facts.origin, origin_reason, facts.pauses,
                              now, stopped=closed))
    return reports


def waiting_since(facts: Facts) -> datetime | None:
    """When the current wait for the customer began (None unless pending without a time)."""
    if facts.state != "pending" or facts.pending_until is not None:
        return None
    return _pause_cycle_start(facts)


def _pause_cycle_start(facts: Facts) -> datetime | None:
    """The start of the wait the open pause would be: the later of its start and the last
    public agent reply; None when no pause is open.

    `waiting_since` while pending without a time; otherwise the cycle whose fired waiting
    marks are kept while the same pause lasts (``#pending <time>``, ``closed``).
    """
    open_pause = next((p for p in reversed(facts.pauses) if p.end is None), None)
    if open_pause is None:
        return None
    since = open_pause.start
    if facts.last_agent_reply_at is not None and facts.last_agent_reply_at > since:
        since = facts.last_agent_reply_at
    return since


def waiting_alarms(waiting: WaitingPolicy, since: datetime) -> list[Alarm]:
    """Reminder 1, reminder 2 and close, chained in working days from `since`."""
    alarms: list[Alarm] = []
    cursor = since
    steps: tuple[tuple[str, AlarmKind, int], ...] = (
        (WAITING_KEYS[0], "reminder", waiting.reminder_days),
        (WAITING_KEYS[1], "reminder", waiting.second_reminder_days),
        (WAITING_KEYS[2], "close", waiting.close_days),
    )
    for key, kind, days in steps:
        if days <= 0:
            continue
        cursor = add_working_days(waiting.calendar, cursor, days)
        alarms.append(Alarm(cursor, key, since.isoformat(), kind))
    return alarms


def compute(
    facts: Facts,
    policy: Policy | None,
    now: datetime,
    *,
    waiting: WaitingPolicy | None = None,
    fired: Mapping[str, str] | None = None,
) -> Schedule:
    """The clocks and the unfired alarms of one ticket as of `now`."""
    fired = fired or {}
    candidates: list[Alarm] = []
    reports = clock_reports(facts, policy, now) if policy is not None else []
    for report in reports:
        if report.status != "running":
            continue
        assert report.due is not None
        if report.warn_at is not None and report.warn_at < report.due:
            candidates.append(Alarm(report.warn_at, f"{report.clock}:warning", report.cycle,
                                    "warning", report.clock))
        candidates.append(Alarm(report.due, f"{report.clock}:breach", report.cycle, "breach",
                                report.clock))
    since = waiting_since(facts)
    if since is not None and waiting is not None:
        candidates.extend(waiting_alarms(waiting, since))
    if facts.state == "pending" and facts.pending_until is not None:
        until = facts.pending_until
        candidates.append(Alarm(until, "pending:reminder", until.isoformat(), "pending"))
    # The cycle each alarm key belongs to now. A fired mark is kept while its cycle is
    # current -- also while the clock is paused or stopped and so has no alarm: pending
    # and closed keep the clock's start, so reopening resumes the same cycle, and a
    # dropped mark would fire that warning or breach (and escalate) a second time. Only
    # a new cycle (new agent reply, new group) drops a mark; a stale one would hide
    # nothing but would grow the row forever.
    current = {alarm.key: alarm.cycle for alarm in candidates}
    for report in reports:
        current.setdefault(f"{report.clock}:warning", report.cycle)
        current.setdefault(f"{report.clock}:breach", report.cycle)
    wait = _pause_cycle_start(facts)
    if wait is not None:
        # The same wait continues through `#pending <time>` or `closed` within one pause:
        # going back to plain `#pending` must not send reminder 1 again.
        for key in WAITING_KEYS:
            current.setdefault(key, wait.isoformat())
    kept = {key: cycle for key, cycle in fired.items() if current.get(key) == cycle}
    pending = tuple(sorted(a for a in candidates if kept.get(a.key) != a.cycle))
    return Schedule(policy, tuple(reports), pending, kept)
