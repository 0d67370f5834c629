"""SLA clocks as pure functions: targets, pauses and resumes, cycles, reminders.

Hand-picked cases pin the documented choices of gateway.escalation.sla; the
properties check the pause arithmetic against the calendar functions it is built on.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.escalation.calendar import (
    Calendar,
    CalendarSettings,
    add_business_minutes,
    business_minutes_between,
)
from gateway.escalation.sla import (
    Facts,
    Pause,
    Policy,
    Target,
    WaitingPolicy,
    compute,
    parse_target,
    waiting_since,
)

BERLIN = ZoneInfo("Europe/Berlin")
CAL = Calendar.from_settings(CalendarSettings(timezone="Europe/Berlin", country="DE",
                                              subdivision="BE"))


def b(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN).astimezone(UTC)


def policy(warning_share: float = 0.75, **targets: Any) -> Policy:
    parsed = {k: parse_target(v) for k, v in (targets or {"first_response": "4h"}).items()}
    return Policy("test", "berlin", CAL, parsed, warning_share)


MON_9 = b(2026, 11, 23, 9)


# --- targets ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    (240, Target(240, "minutes")),
    ("240", Target(240, "minutes")),
    ("90m", Target(90, "minutes")),
    ("90 minutes", Target(90, "minutes")),
    ("4h", Target(240, "minutes")),
    ("1 hour", Target(60, "minutes")),
    ("3wd", Target(3, "working_days")),
    ("3 working days", Target(3, "working_days")),
    ("1 Working Day", Target(1, "working_days")),
])
def test_parse_target(text: int | str, expected: Target) -> None:
    assert parse_target(text) == expected
    assert parse_target(expected.text) == expected


@pytest.mark.parametrize("text", ["0", 0, -5, "3d", "4 hrs", "", "1.5h", True])
def test_bad_targets_are_refused(text: Any) -> None:
    with pytest.raises(ValueError, match=r"target|at least|boolean"):
        parse_target(text)


@pytest.mark.parametrize(("text", "limit"), [
    ("525601m", "at most 525600 business minutes"),
    ("8761h", "at most 525600 business minutes"),
    (999_999_999, "at most 525600 business minutes"),
    ("261wd", "at most 260 working days"),
    ("99999999wd", "at most 260 working days"),
])
def test_targets_beyond_a_year_are_refused(text: int | str, limit: str) -> None:
    # Every ticket change walks the calendar to the deadline: a typo must not stall intake.
    with pytest.raises(ValueError, match=limit):
        parse_target(text)
    assert parse_target("525600m") == parse_target("8760h") == Target(525600, "minutes")
    assert parse_target("260wd") == Target(260, "working_days")


def test_target_descriptions() -> None:
    assert str(parse_target("4h")) == "4 business hours"
    assert str(parse_target(90)) == "90 business minutes"
    assert str(parse_target("1wd")) == "1 working day"


# --- first response ----------------------------------------------------------------------


def test_first_response_and_warning_without_pauses() -> None:
    sched = compute(Facts(origin=MON_9, state="new"), policy(), MON_9)
    [fr] = sched.clocks
    assert (fr.status, fr.due, fr.warn_at) == ("running", b(2026, 11, 23, 13), b(2026, 11, 23, 12))
    assert [(a.key, a.at) for a in sched.alarms] == [
        ("first_response:warning", b(2026, 11, 23, 12)),
        ("first_response:breach", b(2026, 11, 23, 13)),
    ]
    assert sched.next_at == b(2026, 11, 23, 12)


def test_pending_pauses_and_reopening_resumes() -> None:
    # 60 business minutes used, then pending from 10:00 until Tuesday 14:00.
    paused = Facts(origin=MON_9, state="pending", pauses=(Pause(b(2026, 11, 23, 10)),))
    sched = compute(paused, policy(), b(2026, 11, 24, 11))
    [fr] = sched.clocks
    assert (fr.status, fr.due, fr.warn_at, fr.used_minutes) == ("paused", None, None, 60)
    assert fr.remaining_minutes == 180
    assert sched.alarms == ()
    resumed = Facts(origin=MON_9, state="open",
                    pauses=(Pause(b(2026, 11, 23, 10), b(2026, 11, 24, 14)),))
    sched = compute(resumed, policy(), b(2026, 11, 24, 14))
    [fr] = sched.clocks
    # 180 minutes left from Tuesday 14:00: 17:00.
    assert (fr.status, fr.due) == ("running", b(2026, 11, 24, 17))
    # Warning at 180 used = 120 after resuming = 16:00.
    assert fr.warn_at == b(2026, 11, 24, 16)
    assert fr.paused_minutes == 7 * 60 + 5 * 60  # Monday 10-17 and Tuesday 09-14


def test_pause_outside_business_hours_costs_nothing() -> None:
    facts = Facts(origin=MON_9, state="open",
                  pauses=(Pause(b(2026, 11, 23, 18), b(2026, 11, 24, 8)),))
    [fr] = compute(facts, policy(), MON_9).clocks
    assert fr.due == b(2026, 11, 23, 13) and fr.paused_minutes == 0


def test_pause_after_the_deadline_does_not_move_it_back() -> None:
    facts = Facts(origin=MON_9, state="open",
                  pauses=(Pause(b(2026, 11, 23, 14), b(2026, 11, 24, 9)),))
    [fr] = compute(facts, policy(), b(2026, 11, 24, 10)).clocks
    assert fr.due == b(2026, 11, 23, 13)


def test_first_response_met_or_missed() -> None:
    met = Facts(origin=MON_9, state="open", first_response_at=b(2026, 11, 23, 12, 59))
    [fr] = compute(met, policy(), b(2026, 11, 25)).clocks
    assert (fr.status, fr.due, fr.used_minutes) == ("met", None, 239)
    missed = Facts(origin=MON_9, state="open", first_response_at=b(2026, 11, 23, 13, 1))
    assert compute(missed, policy(), b(2026, 11, 25)).clocks[0].status == "missed"


def test_answered_before_moving_groups_has_no_first_response_clock() -> None:
    facts = Facts(origin=b(2026, 11, 24, 9), state="open", first_response_at=MON_9)
    assert compute(facts, policy(), b(2026, 11, 24, 9)).clocks == ()


def test_closed_stops_every_clock() -> None:
    facts = Facts(origin=MON_9, state="closed", pauses=(Pause(b(2026, 11, 23, 10)),))
    sched = compute(facts, policy(first_response="4h", solution="2wd"), b(2026, 11, 23, 11))
    assert [c.status for c in sched.clocks] == ["stopped", "stopped"]
    assert sched.alarms == ()


# --- update ------------------------------------------------------------------------------


def update_policy() -> Policy:
    return policy(first_response="4h", update="2h")


def test_update_clock_waits_for_the_first_response() -> None:
    facts = Facts(origin=MON_9, state="new", unanswered_since=MON_9)
    assert [c.clock for c in compute(facts, update_policy(), MON_9).clocks] == ["first_response"]
    # Without a first-response target the update clock runs from the origin.
    only_update = policy(update="2h")
    [upd] = compute(facts, only_update, MON_9).clocks
    assert (upd.clock, upd.due) == ("update", b(2026, 11, 23, 11))


def test_update_runs_from_the_last_agent_reply_or_the_oldest_unanswered_message() -> None:
    replied = Facts(origin=MON_9, state="open", first_response_at=b(2026, 11, 23, 10),
                    last_agent_reply_at=b(2026, 11, 23, 10))
    upd = compute(replied, update_policy(), b(2026, 11, 23, 10)).clock("update")
    assert upd is not None
    assert (upd.start_reason, upd.due) == ("last public agent reply", b(2026, 11, 23, 12))
    # The customer writes at 11:00 and again at 11:30: the oldest unanswered one counts.
    waiting = Facts(origin=MON_9, state="open", first_response_at=b(2026, 11, 23, 10),
                    last_agent_reply_at=b(2026, 11, 23, 10),
                    unanswered_since=b(2026, 11, 23, 11))
    upd = compute(waiting, update_policy(), b(2026, 11, 23, 11, 30)).clock("update")
    assert upd is not None
    assert upd.start_reason == "oldest unanswered customer message"
    assert upd.due == b(2026, 11, 23, 13)


def test_a_new_cycle_rearms_its_alarms() -> None:
    facts = Facts(origin=MON_9, state="open", first_response_at=b(2026, 11, 23, 10),
                  last_agent_reply_at=b(2026, 11, 23, 10))
    first = compute(facts, update_policy(), b(2026, 11, 23, 12))
    fired = {a.key: a.cycle for a in first.alarms}
    again = compute(facts, update_policy(), b(2026, 11, 23, 12), fired=fired)
    assert again.alarms == () and dict(again.fired) == fired
    # Another agent reply: a new cycle, the fired marks no longer apply (and are pruned).
    later = Facts(origin=MON_9, state="open", first_response_at=b(2026, 11, 23, 10),
                  last_agent_reply_at=b(2026, 11, 23, 14))
    renewed = compute(later, update_policy(), b(2026, 11, 23, 14), fired=fired)
    assert [a.key for a in renewed.alarms] == ["update:warning", "update:breach"]
    assert renewed.fired == {}


def test_pausing_or_closing_keeps_the_fired_marks_of_the_cycle() -> None:
    # Warning at 12:00 fired; the ticket waits (pending) from 12:10, reopens at 14:00.
    pol = policy()
    fired = {"first_response:warning": MON_9.isoformat()}
    pending = Facts(origin=MON_9, state="pending", pauses=(Pause(b(2026, 11, 23, 12, 10)),))
    paused = compute(pending, pol, b(2026, 11, 23, 12, 10), fired=fired)
    assert paused.alarms == () and dict(paused.fired) == fired
    reopened = Facts(origin=MON_9, state="open",
                     pauses=(Pause(b(2026, 11, 23, 12, 10), b(2026, 11, 23, 14)),))
    after = compute(reopened, pol, b(2026, 11, 23, 14), fired=paused.fired)
    # Same cycle (the origin): the warning stays fired, only the moved breach is to come.
    assert [(a.key, a.at) for a in after.alarms] == [
        ("first_response:breach", b(2026, 11, 23, 14, 50))]
    # A breach that fired, then #close and #open: it does not fire (and escalate) again.
    both = {"first_response:warning": MON_9.isoformat(),
            "first_response:breach": MON_9.isoformat()}
    closed = Facts(origin=MON_9, state="closed", pauses=(Pause(b(2026, 11, 23, 14)),))
    stopped = compute(closed, pol, b(2026, 11, 23, 14), fired=both)
    assert dict(stopped.fired) == both
    again = Facts(origin=MON_9, state="open",
                  pauses=(Pause(b(2026, 11, 23, 14), b(2026, 11, 23, 15)),))
    assert compute(again, pol, b(2026, 11, 23, 15), fired=stopped.fired).alarms == ()


def test_a_wait_keeps_its_sent_reminders_through_pending_until() -> None:
    # Waiting since Monday 10:00; reminder 1 fired. The agent sets a reminder time, then
    # goes back to plain #pending without replying: the same wait, no second reminder 1.
    since = b(2026, 11, 23, 10)
    pauses = (Pause(since),)
    waiting = WaitingPolicy(CAL, 2, 3, 1)
    fired = {"waiting:reminder1": since.isoformat()}
    timed = Facts(origin=MON_9, state="pending", last_agent_reply_at=since, pauses=pauses,
                  pending_until=b(2026, 11, 26, 14))
    mid = compute(timed, None, b(2026, 11, 25, 11), waiting=waiting, fired=fired)
    assert [a.key for a in mid.alarms] == ["pending:reminder"]
    assert dict(mid.fired) == fired
    plain = Facts(origin=MON_9, state="pending", last_agent_reply_at=since, pauses=pauses)
    back = compute(plain, None, b(2026, 11, 25, 12), waiting=waiting, fired=mid.fired)
    assert [a.key for a in back.alarms] == ["waiting:reminder2", "waiting:close"]


# --- working days ------------------------------------------------------------------------


def test_working_days_keep_the_wall_time() -> None:
    saturday = b(2026, 11, 28, 11)
    [sol] = compute(Facts(origin=saturday, state="new"), policy(solution="3wd"), saturday).clocks
    # Saturday 11:00 + 3 working days = Thursday 09:00 (normalised to Monday 09:00 first).
    assert sol.due == b(2026, 12, 3, 9)
    assert sol.target_minutes == 3 * 480
    assert sol.warn_at == b(2026, 12, 2, 11)  # 75% of 1440 = 1080 minutes


def test_working_days_after_a_pause_land_on_an_interval_start() -> None:
    facts = Facts(origin=MON_9, state="open",
                  pauses=(Pause(MON_9, b(2026, 11, 24, 9)),))
    [sol] = compute(facts, policy(solution="1wd"), b(2026, 11, 24, 9)).clocks
    # Counting 480 minutes from Tuesday 09:00 ends at 17:00; read as Wednesday 09:00.
    assert sol.due == b(2026, 11, 25, 9)


def test_good_friday_and_easter_monday_in_berlin() -> None:
    # Thursday before Easter 2024, 16:30: 30 minutes left that day, then four days shut.
    start = b(2024, 3, 28, 16, 30)
    [fr] = compute(Facts(origin=start, state="new"), policy(), start).clocks
    assert fr.warn_at == b(2024, 4, 2, 11, 30)  # after the DST change: CEST
    assert fr.due == b(2024, 4, 2, 12, 30)
    assert fr.due == datetime(2024, 4, 2, 10, 30, tzinfo=UTC)


def test_warning_share_zero_disables_warnings() -> None:
    sched = compute(Facts(origin=MON_9, state="new"), policy(0.0), MON_9)
    assert [a.kind for a in sched.alarms] == ["breach"]


# --- waiting for the customer -------------------------------------------------------------


def test_waiting_reminders_chain_in_working_days() -> None:
    facts = Facts(origin=MON_9, state="pending", last_agent_reply_at=b(2026, 11, 23, 10),
                  pauses=(Pause(b(2026, 11, 23, 10)),))
    assert waiting_since(facts) == b(2026, 11, 23, 10)
    sched = compute(facts, None, b(2026, 11, 23, 10), waiting=WaitingPolicy(CAL, 2, 3, 1))
    assert [(a.key, a.at) for a in sched.alarms] == [
        ("waiting:reminder1", b(2026, 11, 25, 10)),
        ("waiting:reminder2", b(2026, 11, 30, 10)),
        ("waiting:close", b(2026, 12, 1, 10)),
    ]
    skipping = compute(facts, None, b(2026, 11, 23, 10), waiting=WaitingPolicy(CAL, 0, 0, 4))
    assert [(a.key, a.at) for a in skipping.alarms] == [("waiting:close", b(2026, 11, 27, 10))]


def test_pending_until_is_an_owner_reminder_not_a_wait() -> None:
    until = datetime(2026, 11, 25, 14, tzinfo=UTC)
    facts = Facts(origin=MON_9, state="pending", pending_until=until,
                  pauses=(Pause(b(2026, 11, 23, 10)),))
    assert waiting_since(facts) is None
    sched = compute(facts, policy(), b(2026, 11, 23, 10), waiting=WaitingPolicy(CAL))
    assert [(a.key, a.at) for a in sched.alarms] == [("pending:reminder", until)]


# --- properties --------------------------------------------------------------------------

instants = st.integers(min_value=0, max_value=365 * 24 * 60).map(
    lambda m: datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=m))
spans = st.integers(min_value=1, max_value=20 * 24 * 60)


@settings(max_examples=150, deadline=None)
@given(origin=instants, minutes=st.integers(min_value=1, max_value=5000),
       pause_at=st.integers(min_value=0, max_value=10 * 24 * 60), pause_len=spans)
def test_a_closed_pause_adds_exactly_its_business_minutes(
    origin: datetime, minutes: int, pause_at: int, pause_len: int
) -> None:
    start = origin + timedelta(minutes=pause_at)
    pause = Pause(start, start + timedelta(minutes=pause_len))
    pol = policy(first_response=minutes)
    plain = compute(Facts(origin=origin, state="open"), pol, origin).clocks[0].due
    assert plain is not None
    [fr] = compute(Facts(origin=origin, state="open", pauses=(pause,)), pol, origin).clocks
    assert fr.due is not None
    if pause.start >= plain:
        assert fr.due == plain  # a pause after the deadline changes nothing
    else:
        # Unpaused business minutes from the origin to the deadline equal the target.
        unpaused = business_minutes_between(CAL, origin, fr.due) - business_minutes_between(
            CAL, pause.start, min(pause.end or fr.due, fr.due))
        assert unpaused == minutes
        assert fr.due >= plain


@settings(max_examples=100, deadline=None)
@given(origin=instants, minutes=st.integers(min_value=1, max_value=5000),
       share=st.floats(min_value=0.05, max_value=0.95))
def test_warning_comes_before_the_deadline(origin: datetime, minutes: int, share: float) -> None:
    [fr] = compute(Facts(origin=origin, state="new"), policy(share, first_response=minutes),
                   origin).clocks
    assert fr.due == add_business_minutes(CAL, origin, minutes)
    if fr.warn_at is not None:
        assert origin <= fr.warn_at <= fr.due
        assert business_minutes_between(CAL, origin, fr.warn_at) == int(minutes * share)
