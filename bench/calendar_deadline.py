"""How many SLA deadlines per second the business-hours calendar computes.

Run from the repository root:

    .venv/bin/python bench/calendar_deadline.py [--seconds 1.0]

The calendar is the typical one: Europe/Berlin, Mon-Fri 09:00-12:00 and
13:00-17:00, German (Berlin) public holidays, Christmas Eve closed. Starts are
random minutes of 2026, so deadlines cross weekends, holidays and both DST
changes. "warm" reuses one Calendar (its per-date and per-year caches fill once,
as in the daemon); "cold" compiles a fresh Calendar from the settings for every
deadline, which includes building the holiday table. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from gateway.escalation.calendar import (
    Calendar,
    CalendarSettings,
    add_business_minutes,
    add_working_days,
)

SETTINGS = CalendarSettings(
    timezone="Europe/Berlin",
    hours=dict.fromkeys(("mon", "tue", "wed", "thu", "fri"), ("09:00-12:00", "13:00-17:00")),
    country="DE",
    subdivision="BE",
    closures=("12-24",),
)

Target = Callable[[Calendar, datetime], datetime]
TARGETS: list[tuple[str, Target]] = [
    ("8 business hours (480 min)", lambda cal, t: add_business_minutes(cal, t, 480)),
    ("2400 business minutes", lambda cal, t: add_business_minutes(cal, t, 2400)),
    ("3 working days", lambda cal, t: add_working_days(cal, t, 3)),
    ("30 working days", lambda cal, t: add_working_days(cal, t, 30)),
]


def starts(count: int) -> list[datetime]:
    rng = random.Random(2026)
    year_start = datetime(2026, 1, 1, tzinfo=UTC)
    return [year_start + timedelta(minutes=rng.randrange(365 * 24 * 60)) for _ in range(count)]


def rate(target: Target, instants: list[datetime], seconds: float, cold: bool) -> float:
    """Deadlines per second, looping over ``instants`` for about ``seconds``."""
    cal = Calendar.from_settings(SETTINGS)
    for instant in instants:  # warm-up: fill the caches, import everything
        target(cal, instant)
    done = 0
    began = time.perf_counter()
    while (elapsed := time.perf_counter() - began) < seconds:
        for instant in instants:
            if cold:
                cal = Calendar.from_settings(SETTINGS)
            target(cal, instant)
        done += len(instants)
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args()
    warm_starts, cold_starts = starts(1000), starts(50)
    print(f"{'target':<28} {'warm deadlines/s':>18} {'cold deadlines/s':>18}")
    for name, target in TARGETS:
        warm = rate(target, warm_starts, args.seconds, cold=False)
        cold = rate(target, cold_starts, args.seconds, cold=True)
        print(f"{name:<28} {warm:>18,.0f} {cold:>18,.0f}")


if __name__ == "__main__":
    main()
