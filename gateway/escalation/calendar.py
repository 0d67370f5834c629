"""Business-hours calendars: when the helpdesk is open, and when an SLA deadline falls due.

This module's sole purpose is calendar arithmetic for escalation deadlines. One
``[calendars.<name>]`` table is validated into a frozen `CalendarSettings`,
compiled into a `Calendar`, and then answered by pure functions:

* `add_business_minutes` -- the instant at which N business minutes have elapsed;
* `business_minutes_between` -- business minutes in ``[a, b)``;
* `next_business_moment` -- ``t`` if open at ``t``, else the start of the next interval;
* `add_working_days` -- targets stated in working days;
* `describe_days` -- one `DayInfo` per date, for ``helpdeskd calendar show``.

A ``[calendars.<name>]`` table looks like this::

    [calendars.support]
    timezone = "Europe/Berlin"
    country = "DE"
    subdivision = "BE"
    closures = ["12-24", "12-31", "2026-12-28..2026-12-30"]
    open_days = [2026-06-06, "2026-06-07 10:00-14:00"]

    [calendars.support.hours]
    mon = ["09:00-12:00", "13:00-17:00"]
    tue = ["09:00-12:00", "13:00-17:00"]
    sat = []

Documented choices (each one is pinned by a test):

* **Wall-clock intervals.** Business hours are local wall-clock times in the
  calendar's IANA zone, minute precision, ``HH:MM-HH:MM`` with ``00:00 <= start <
  end <= 24:00``; ``24:00`` is the following midnight, so ``20:00-24:00`` on one
  day and ``00:00-02:00`` on the next are one continuous stretch. An interval
  never crosses midnight (split it at ``24:00``). A day's intervals are listed
  in order and may touch but not overlap. A weekday missing from
  ``hours`` (or given ``[]``) is closed; the default is Mon-Fri 09:00-17:00.
* **Daylight saving time.** An interval lasts the *real* time between its
  wall-clock ends: ``09:00-17:00`` is 8 hours on every day, also on DST days,
  because the Central European change happens at night; ``00:00-24:00`` is 23
  hours on the spring-forward day and 25 on the fall-back day. A wall time that
  occurs twice (fall back) means its first occurrence; a wall time the clock
  skips (spring forward) means the moment of the jump. In short, a wall time
  ``w`` maps to the first instant at which the local clock reads ``w`` or later.
* **Holidays** come from the ``holidays`` package for ``country`` (ISO 3166
  code), optional ``subdivision`` and ``holiday_categories`` (empty means the
  package's default, the public holidays). Observed days are included (US
  Independence Day on a Saturday closes the Friday). Names are in the country's
  own language (``Karfreitag``), independent of the daemon's locale.
* **Closures** are ``YYYY-MM-DD``, an inclusive range ``YYYY-MM-DD..YYYY-MM-DD``,
  a yearly ``MM-DD`` or a yearly range ``MM-DD..MM-DD`` (which may wrap the year
  end: ``12-24..01-01``). Yearly closures that together close every day of the
  year (02-29 aside) are refused. A calendar with no business time from today on
  (a closure running for decades, only past open days) is refused when the
  configuration loads (`never_open_again`, asked by `gateway.config`).
* **Open days** win over everything else (holiday, closure, weekend). An entry
  is a date, ``YYYY-MM-DD``, meaning "a normal day": the hours of its own
  weekday; if that weekday has no hours the entry must list them after the
  date, ``"2026-06-07 10:00-14:00 15:00-16:00"``, or it is refused at load.
* **Instants.** Inputs may be in any time zone; outputs are UTC-aware; naive
  datetimes raise ``ValueError``. Instants keep their own precision (seconds,
  microseconds); `business_minutes_between` rounds down to whole minutes.
* **Zero is the start.** ``add_business_minutes(cal, t, 0)`` and
  ``add_working_days(cal, t, 0)`` return ``t`` itself, even outside business
  hours: no time has to pass, so nothing is due later than now. For N >= 1 the
  result always lies in business hours, and may be the *end* of an interval
  (8 business hours from Monday 09:00 is Monday 17:00, not Tuesday 09:00).
  Negative amounts raise ``ValueError``; deadlines only move forward.
* **Working days.** A working day is a date with any business time. The start
  is first moved to `next_business_moment`; the result is the same local wall
  time N working days later, clamped into that day's business hours: forward to
  the next interval start if that wall time is before or between intervals, back
  to the end of the last interval if the day's hours are already over (the
  deadline stays on the Nth working day). Saturday 11:00 + 3 working days is
  Thursday 09:00 in a Mon-Fri 09-17 calendar.
* **Closed reasons** in `DayInfo.closed`: ``"holiday: <name>"`` before
  ``"closure"`` before ``"weekend"`` (a weekday without hours).

A `Calendar` memoises its per-date plans and per-year holiday tables (a bounded
cache, so it is safe to keep one per configured calendar for the daemon's life);
the results are a pure function of the settings and the arguments.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from typing import Annotated, Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

__all__ = [
    "Calendar",
    "CalendarError",
    "CalendarSettings",
    "DayInfo",
    "WallInterval",
    "add_business_minutes",
    "add_working_days",
    "business_minutes_between",
    "describe_days",
    "never_open_again",
    "next_business_moment",
    "parse_interval",
]

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: Final[tuple[Weekday, ...]] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

_ONE_DAY: Final = timedelta(days=1)
_ONE_MINUTE: Final = timedelta(minutes=1)
# A calendar that stays shut this long is misconfigured (e.g. only past open_days);
# failing beats looping until datetime.max.
_MAX_CLOSED_RUN_DAYS: Final = 5 * 366
# Memoised per-date plans; ten years of dates is far more than deadlines ever touch,
# and the bound keeps a long-running daemon's memory flat.
_DAY_CACHE_LIMIT: Final = 4000


class CalendarError(ValueError):
    """A calendar cannot answer: it has no business time in the period asked about."""


# --- parsing -----------------------------------------------------------------------------

_INTERVAL_RE: Final = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_DATE_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_YEARLY_RE: Final = re.compile(r"^(\d{2})-(\d{2})$")


@dataclass(frozen=True, slots=True, order=True)
class WallInterval:
    """Business hours on one day in local wall-clock minutes after midnight.

    ``end`` may be 1440, i.e. 24:00, the following midnight.
    """

    start: int
    end: int

    def __str__(self) -> str:
        return f"{_clock(self.start)}-{_clock(self.end)}"


def _clock(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def parse_interval(text: str) -> WallInterval:
    """Parse ``"HH:MM-HH:MM"`` (``00:00 <= start < end <= 24:00``); ValueError otherwise."""
    match = _INTERVAL_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not an interval like '09:00-17:00'")
    start_h, start_m, end_h, end_m = (int(group) for group in match.groups())
    if start_h > 23 or start_m > 59 or end_m > 59 or end_h > 24 or (end_h == 24 and end_m):
        raise ValueError(f"{text!r}: times run from 00:00 to 24:00")
    start, end = start_h * 60 + start_m, end_h * 60 + end_m
    if start >= end:
        raise ValueError(
            f"{text!r}: the start must be before the end; an interval cannot cross"
            " midnight, so split it at 24:00 (e.g. '22:00-24:00' and '00:00-06:00')"
        )
    return WallInterval(start, end)


def _normalise_interval(text: str) -> str:
    return str(parse_interval(text))


def _check_day(intervals: tuple[str, ...]) -> tuple[str, ...]:
    parsed = [parse_interval(text) for text in intervals]
    for before, after in pairwise(parsed):
        if after.start < before.end:
            raise ValueError(
                f"{before} and {after} overlap or are out of order;"
                " list a day's intervals in order, without overlaps"
            )
    return intervals


def _parse_date(text: str) -> date:
    if not _DATE_RE.match(text):
        raise ValueError(f"{text!r} is not a date like 2026-12-24")
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid date: {exc}") from None


# Month-day pairs of a leap year, in calendar order: yearly closures index into it.
_MONTH_DAYS: Final[tuple[tuple[int, int], ...]] = tuple(
    (day.month, day.day) for day in (date(2000, 1, 1) + timedelta(days=n) for n in range(366))
)


_COMMON_YEAR: Final = frozenset(_MONTH_DAYS) - {(2, 29)}


def _parse_month_day(text: str) -> tuple[int, int]:
    match = _YEARLY_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a yearly date like 12-24")
    month, day = int(match.group(1)), int(match.group(2))
    if (month, day) not in _MONTH_DAYS:
        raise ValueError(f"{text!r} is not a day of the year")
    return month, day


@dataclass(frozen=True, slots=True)
class _Closure:
    """One parsed closure: a date range, or a set of yearly month-days."""

    first: date | None = None
    last: date | None = None
    yearly: frozenset[tuple[int, int]] = frozenset()


def _parse_closure(text: str) -> _Closure:
    parts = [part.strip() for part in text.strip().split("..")]
    if len(parts) > 2 or not all(parts):
        raise ValueError(
            f"{text!r} is not a closure: use 2026-12-24, 2026-12-24..2026-12-31,"
            " 12-24 (every year) or 12-24..01-01 (every year)"
        )
    kinds = {bool(_YEARLY_RE.match(part)) for part in parts}
    if len(kinds) > 1:
        raise ValueError(f"{text!r}: both ends must be dates (2026-12-24) or both yearly (12-24)")
    if kinds == {True}:
        first_md = _parse_month_day(parts[0])
        last_md = _parse_month_day(parts[-1])
        i, j = _MONTH_DAYS.index(first_md), _MONTH_DAYS.index(last_md)
        # A yearly range may wrap the year end (12-24..01-01).
        span = _MONTH_DAYS[i : j + 1] if i <= j else _MONTH_DAYS[i:] + _MONTH_DAYS[: j + 1]
        if len(span) == len(_MONTH_DAYS):
            raise ValueError(f"{text!r} closes every day of the year")
        return _Closure(yearly=frozenset(span))
    first, last = _parse_date(parts[0]), _parse_date(parts[-1])
    if last < first:
        raise ValueError(f"{text!r}: the range ends before it starts")
    return _Closure(first=first, last=last)


def _date_as_text(value: Any) -> Any:
    # TOML has native dates (closures = [2026-12-24]); accept them as the ISO string.
    if isinstance(value, datetime):
        raise ValueError(f"expected a date, not the date and time {value}")
    if isinstance(value, date):
        return value.isoformat()
    return value


def _normalise_closure(text: str) -> str:
    _parse_closure(text)
    return "..".join(part.strip() for part in text.strip().split(".."))


@dataclass(frozen=True, slots=True)
class _OpenDay:
    day: date
    # None: the hours of the date's own weekday.
    intervals: tuple[WallInterval, ...] | None


def _parse_open_day(text: str) -> _OpenDay:
    words = text.split()
    if not words:
        raise ValueError("an open day is a date, optionally followed by intervals")
    day = _parse_date(words[0])
    if len(words) == 1:
        return _OpenDay(day, None)
    intervals = tuple(parse_interval(word) for word in words[1:])
    _check_day(tuple(str(interval) for interval in intervals))
    return _OpenDay(day, intervals)


def _normalise_open_day(text: str) -> str:
    parsed = _parse_open_day(text)
    return " ".join([parsed.day.isoformat(), *(str(i) for i in parsed.intervals or ())])


# --- settings ----------------------------------------------------------------------------

IntervalText = Annotated[str, AfterValidator(_normalise_interval)]
DayHours = Annotated[tuple[IntervalText, ...], AfterValidator(_check_day)]
ClosureText = Annotated[str, BeforeValidator(_date_as_text), AfterValidator(_normalise_closure)]
OpenDayText = Annotated[str, BeforeValidator(_date_as_text), AfterValidator(_normalise_open_day)]


def _default_hours() -> dict[Weekday, tuple[str, ...]]:
    return {day: ("09:00-17:00",) for day in WEEKDAYS[:5]}


class CalendarSettings(BaseModel):
    """One ``[calendars.<name>]`` table: zone, weekly hours, holidays, closures, open days."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timezone: str
    hours: dict[Weekday, DayHours] = Field(default_factory=_default_hours)
    country: str | None = None
    subdivision: str | None = None
    holiday_categories: tuple[str, ...] = ()
    closures: tuple[ClosureText, ...] = ()
    open_days: tuple[OpenDayText, ...] = ()

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            # "localtime" is the host's /etc/localtime, not an IANA name: deadlines
            # must not change when the daemon moves to another machine.
            if value == "localtime":
                raise ValueError(value)
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown IANA time zone {value!r} (expected e.g. 'Europe/Berlin')"
            ) from None
        return value

    @field_validator("country")
    @classmethod
    def _known_country(cls, value: str | None) -> str | None:
        if value is None:
            return None
        code = value.strip().upper()
        if code not in holidays.list_supported_countries():
            raise ValueError(
                f"{value!r} is not a country the holidays package knows (ISO 3166 code, e.g. 'DE')"
            )
        return code

    @model_validator(mode="after")
    def _consistent(self) -> CalendarSettings:
        self._check_holidays()
        seen: set[date] = set()
        for index, text in enumerate(self.open_days):
            entry = _parse_open_day(text)
            if entry.day in seen:
                raise ValueError(f"open_days.{index}: {entry.day} is listed twice")
            seen.add(entry.day)
            weekday = WEEKDAYS[entry.day.weekday()]
            if entry.intervals is None and not self.hours.get(weekday):
                raise ValueError(
                    f"open_days.{index}: {entry.day} is a {weekday}, which has no hours;"
                    f" list them after the date, e.g. '{entry.day} 10:00-14:00'"
                )
        if not any(self.hours.values()) and not self.open_days:
            raise ValueError("hours: no weekday has business hours and there are no open_days")
        # Each yearly closure is refused alone when it closes the whole year; together
        # they can too (01-01..06-30 and 07-01..12-31). Such a calendar is open on its
        # open_days at most and then never again: every deadline ends in CalendarError.
        # 02-29 alone left open is no better (open one day in four years).
        yearly: set[tuple[int, int]] = set()
        for text in self.closures:
            yearly |= _parse_closure(text).yearly
        if yearly >= _COMMON_YEAR:
            raise ValueError("closures: the yearly closures together close every day of"
                             " the year")
        return self

    def _check_holidays(self) -> None:
        if self.country is None:
            if self.subdivision is not None or self.holiday_categories:
                raise ValueError("subdivision and holiday_categories need a country")
            return
        entity = holidays.country_holidays(self.country)
        if self.subdivision is not None:
            try:
                holidays.country_holidays(self.country, subdiv=self.subdivision)
            except NotImplementedError:
                known = ", ".join(entity.subdivisions) or "none"
                raise ValueError(
                    f"subdivision: {self.subdivision!r} is not a subdivision of"
                    f" {self.country} (known: {known})"
                ) from None
        supported = tuple(entity.supported_categories)
        unknown = [c for c in self.holiday_categories if c not in supported]
        if unknown:
            raise ValueError(
                f"holiday_categories: {', '.join(map(repr, unknown))} not supported for"
                f" {self.country} (supported: {', '.join(supported)})"
            )


# --- the compiled calendar ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DayInfo:
    """One date of a calendar: its hours, their real length, and why it is closed."""

    date: date
    #: Wall-clock business intervals (empty when closed).
    intervals: tuple[WallInterval, ...]
    #: The same intervals as UTC instants; zero-length ones (inside a DST gap) dropped.
    spans: tuple[tuple[datetime, datetime], ...]
    #: Real business time on this date (differs from the wall-clock sum on DST days).
    duration: timedelta
    #: ``"holiday: <name>"``, ``"closure"`` or ``"weekend"``; None when open.
    closed: str | None
    #: ``"open day"`` (and what it overrides) for dates listed in open_days.
    note: str | None

    @property
    def minutes(self) -> int:
        """Business minutes on this date."""
        return self.duration // _ONE_MINUTE

    @property
    def weekday(self) -> Weekday:
        """Short weekday name, ``mon`` .. ``sun``."""
        return WEEKDAYS[self.date.weekday()]


class Calendar:
    """A compiled `CalendarSettings`; build with `Calendar.from_settings`."""

    __slots__ = (
        "_closed_dates",
        "_closed_ranges",
        "_closed_yearly",
        "_days",
        "_holiday_tables",
        "_language",
        "_open_days",
        "_weekly",
        "settings",
        "tz",
    )

    def __init__(self, settings: CalendarSettings) -> None:
        self.settings = settings
        self.tz = ZoneInfo(settings.timezone)
        self._weekly: tuple[tuple[WallInterval, ...], ...] = tuple(
            tuple(parse_interval(text) for text in settings.hours.get(day, ())) for day in WEEKDAYS
        )
        singles: set[date] = set()
        ranges: list[tuple[date, date]] = []
        yearly: set[tuple[int, int]] = set()
        for text in settings.closures:
            closure = _parse_closure(text)
            yearly |= closure.yearly
            if closure.first is not None and closure.last is not None:
                if closure.first == closure.last:
                    singles.add(closure.first)
                else:
                    ranges.append((closure.first, closure.last))
        self._closed_dates = frozenset(singles)
        self._closed_ranges = tuple(ranges)
        self._closed_yearly = frozenset(yearly)
        self._open_days: Mapping[date, tuple[WallInterval, ...] | None] = {
            entry.day: entry.intervals for entry in map(_parse_open_day, settings.open_days)
        }
        self._language: str | None = None
        if settings.country is not None:
            # The country's own language, so names do not depend on the daemon's locale.
            self._language = holidays.country_holidays(settings.country).default_language
        self._holiday_tables: dict[int, dict[date, str]] = {}
        self._days: dict[date, DayInfo] = {}

    @classmethod
    def from_settings(cls, settings: CalendarSettings) -> Calendar:
        """Compile validated settings into a calendar."""
        return cls(settings)

    def __repr__(self) -> str:
        return f"<Calendar {self.settings.timezone} country={self.settings.country}>"

    def day(self, day: date) -> DayInfo:
        """The plan for one local date (memoised)."""
        info = self._days.get(day)
        if info is None:
            if len(self._days) >= _DAY_CACHE_LIMIT:
                self._days.clear()
            info = self._days[day] = self._plan(day)
        return info

    def holiday(self, day: date) -> str | None:
        """The public holiday's name on ``day``, or None."""
        if self.settings.country is None:
            return None
        table = self._holiday_tables.get(day.year)
        if table is None:
            table = self._holiday_tables[day.year] = self._holidays_of(day.year)
        return table.get(day)

    def _holidays_of(self, year: int) -> dict[date, str]:
        settings = self.settings
        if settings.country is None:
            return {}
        entity = holidays.country_holidays(
            settings.country,
            subdiv=settings.subdivision,
            # Neighbouring years too: an observed day may fall on the other side of
            # New Year (US New Year's Day 2022 was observed on 2021-12-31).
            years=range(year - 1, year + 2),
            categories=settings.holiday_categories or None,
            language=self._language,
        )
        return {day: str(name) for day, name in entity.items() if day.year == year}

    def _closed_by_closure(self, day: date) -> bool:
        return (
            day in self._closed_dates
            or (day.month, day.day) in self._closed_yearly
            or any(first <= day <= last for first, last in self._closed_ranges)
        )

    def _plan(self, day: date) -> DayInfo:
        weekly = self._weekly[day.weekday()]
        holiday = self.holiday(day)
        if holiday is not None:
            reason: str | None = f"holiday: {holiday}"
        elif self._closed_by_closure(day):
            reason = "closure"
        elif not weekly:
            reason = "weekend"
        else:
            reason = None
        note = None
        intervals: tuple[WallInterval, ...]
        if day in self._open_days:
            explicit = self._open_days[day]
            intervals = weekly if explicit is None else explicit
            note = "open day" if reason is None else f"open day (overrides {reason})"
            reason = None
        elif reason is not None:
            intervals = ()
        else:
            intervals = weekly
        spans: list[tuple[datetime, datetime]] = []
        for interval in intervals:
            start = _wall_to_utc(self.tz, day, interval.start)
            end = _wall_to_utc(self.tz, day, interval.end)
            if end > start:
                spans.append((start, end))
        duration = sum((end - start for start, end in spans), timedelta())
        return DayInfo(day, intervals, tuple(spans), duration, reason, note)

    def local_date(self, instant: datetime) -> date:
        """The calendar-local date of an aware instant."""
        return instant.astimezone(self.tz).date()


def _wall_to_utc(tz: ZoneInfo, day: date, minute: int) -> datetime:
    naive = datetime.combine(day, time()) + timedelta(minutes=minute)
    return _local_to_utc(tz, naive)


def _local_to_utc(tz: ZoneInfo, naive: datetime) -> datetime:
    """The first instant at which the local clock in ``tz`` reads ``naive`` or later."""
    # fold=0 is the earlier reading of an ambiguous (fall-back) wall time: PEP 495.
    instant = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if instant.astimezone(tz).replace(tzinfo=None) == naive:
        return instant
    # The clock skips ``naive`` (spring forward). fold=0 used the old offset and landed
    # after the jump, fold=1 the new one and landed before it; the jump itself is the
    # first instant reading ``naive`` or later. Transitions fall on whole seconds.
    before = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    after = instant
    while after - before > timedelta(seconds=1):
        middle = before + timedelta(seconds=int((after - before).total_seconds()) // 2)
        if middle.astimezone(tz).replace(tzinfo=None) >= naive:
            after = middle
        else:
            before = middle
    return after


# --- arithmetic --------------------------------------------------------------------------


def _utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {value!r}")
    return value.astimezone(UTC)


def _non_negative(value: int, name: str) -> None:
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")


class _DayWalk:
    """Consecutive days from a date, refusing to run on through years of closure."""

    __slots__ = ("_cal", "_closed_run", "_day")

    def __init__(self, cal: Calendar, first: date) -> None:
        self._cal = cal
        self._day = first
        self._closed_run = 0

    def next(self) -> DayInfo:
        info = self._cal.day(self._day)
        if info.spans:
            self._closed_run = 0
        else:
            self._closed_run += 1
            if self._closed_run > _MAX_CLOSED_RUN_DAYS:
                raise CalendarError(
                    f"calendar ({self._cal.settings.timezone}) has no business hours in the"
                    f" {_MAX_CLOSED_RUN_DAYS} days up to {self._day}"
                )
        self._day += _ONE_DAY
        return info


def _walk_from(cal: Calendar, instant: datetime) -> _DayWalk:
    # Start a day early: an instant belongs to the previous date's last interval only
    # in odd zones (a DST gap across midnight), but being safe costs one cached lookup.
    return _DayWalk(cal, cal.local_date(instant) - _ONE_DAY)


def add_business_minutes(cal: Calendar, start: datetime, minutes: int) -> datetime:
    """The UTC instant at which ``minutes`` business minutes have elapsed after ``start``.

    0 returns ``start`` itself; otherwise the result lies in business hours or at
    the end of an interval.
    """
    start = _utc(start, "start")
    _non_negative(minutes, "minutes")
    if minutes == 0:
        return start
    remaining = timedelta(minutes=minutes)
    walk = _walk_from(cal, start)
    while True:
        info = walk.next()
        spans = info.spans
        if not spans or spans[-1][1] <= start:
            continue
        # Skip whole days without looking at their intervals.
        if start <= spans[0][0] and info.duration < remaining:
            remaining -= info.duration
            continue
        for span_start, span_end in spans:
            if span_end <= start:
                continue
            begin = max(span_start, start)
            if remaining <= span_end - begin:
                return begin + remaining
            remaining -= span_end - begin


def business_minutes_between(cal: Calendar, a: datetime, b: datetime) -> int:
    """Whole business minutes in ``[a, b)``; 0 when ``b <= a``."""
    a, b = _utc(a, "a"), _utc(b, "b")
    if b <= a:
        return 0
    total = timedelta()
    day = cal.local_date(a) - _ONE_DAY
    last = cal.local_date(b) + _ONE_DAY
    while day <= last:
        info = cal.day(day)
        spans = info.spans
        if spans:
            if a <= spans[0][0] and spans[-1][1] <= b:
                total += info.duration
            else:
                for span_start, span_end in spans:
                    overlap = min(span_end, b) - max(span_start, a)
                    if overlap > timedelta():
                        total += overlap
        day += _ONE_DAY
    return total // _ONE_MINUTE


def next_business_moment(cal: Calendar, t: datetime) -> datetime:
    """``t`` (as UTC) if the calendar is open at ``t``, else the start of the next interval.

    Intervals are half-open: at 17:00 a 09:00-17:00 day is closed.
    """
    t = _utc(t, "t")
    walk = _walk_from(cal, t)
    while True:
        for span_start, span_end in walk.next().spans:
            if span_end > t:
                return max(span_start, t)


def add_working_days(cal: Calendar, start: datetime, days: int) -> datetime:
    """The same local wall time ``days`` working days after ``start``, in business hours.

    See the module docstring for how the start is normalised and the result clamped.
    """
    start = _utc(start, "start")
    _non_negative(days, "days")
    if days == 0:
        return start
    begin = next_business_moment(cal, start).astimezone(cal.tz)
    wall = begin.replace(tzinfo=None) - datetime.combine(begin.date(), time())
    walk = _DayWalk(cal, begin.date() + _ONE_DAY)
    counted = 0
    while True:
        target = walk.next()
        if target.spans:
            counted += 1
            if counted == days:
                break
    wanted = _local_to_utc(cal.tz, datetime.combine(target.date, time()) + wall)
    for span_start, span_end in target.spans:
        if wanted < span_end:
            return max(span_start, wanted)
    return target.spans[-1][1]


def never_open_again(cal: Calendar, now: datetime) -> str | None:
    """Why `cal` has no business time from `now` on, or None when it will open again.

    Validation asks this of every configured calendar at load: a calendar whose
    closures run for years (``2020-01-01..2099-12-31``) or that only has past
    ``open_days`` is otherwise accepted and fails on every ticket change instead.
    """
    try:
        next_business_moment(cal, now)
    except CalendarError:
        return (
            f"never open again: no business hours in the {_MAX_CLOSED_RUN_DAYS} days from"
            f" {cal.local_date(now)} (check hours, closures and open_days)"
        )
    return None


def describe_days(cal: Calendar, start_date: date, days: int) -> list[DayInfo]:
    """``days`` consecutive dates from ``start_date`` with their hours and closed reasons."""
    _non_negative(days, "days")
    return [cal.day(start_date + timedelta(days=n)) for n in range(days)]
