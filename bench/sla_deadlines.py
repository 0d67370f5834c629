"""SLA deadlines: cost per ticket, and the daemon with many open tickets in PostgreSQL.

Run from the repository root (PostgreSQL at 127.0.0.1:5432, trust auth):

    .venv/bin/python bench/sla_deadlines.py [--tickets 100000] [--hot 200] [--backlog 2000]
    .venv/bin/python bench/sla_deadlines.py --skip-db          # part 1 only

Part 1, deadline computation per ticket (pure, no database): `sla.compute` for a
typical ticket (first response, update, solution over the Berlin calendar with
holidays and a lunch break), without and with pauses, and `SlaEngine.schedule`
(policy lookup + compute) as the observer runs it on every ticket change.

Part 2, the daemon against a scratch PostgreSQL database holding ``--tickets``
open tickets inserted with COPY: their deadlines spread over the next 30 days,
except ``--hot`` tickets that fall due 5 to 15 seconds after the daemon starts.
The calendar here is 24x7, so that "due in 10 seconds" exists whatever the hour
the bench runs at. It prints

* daemon start to armed: `App(...)` (schema check) + `App.start()` until the timer
  is armed at the earliest deadline (the first pass included);
* memory: resident set size before and after start (the daemon never loads the
  tickets: one ``min(next_escalation_at)`` index lookup arms the timer);
* lag between each hot ticket's deadline and its escalation mail row: "fired" is
  the row's timestamp (the firing pass's clock) minus the deadline; "visible" is
  when a poller on its own connection first saw the committed row (polls every
  20 ms, so up to 20 ms of it is the poller's).

Prints figures; asserts nothing. The database is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import random
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from gateway.config import Settings, parse_settings
from gateway.daemon import App
from gateway.escalation.calendar import Calendar, CalendarSettings
from gateway.escalation.engine import SlaEngine
from gateway.escalation.sla import Facts, Pause, Policy, compute, parse_target
from gateway.followup import Hooks
from gateway.notify import Notifier, Templates
from gateway.store.models import Ticket

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
UTC = dt.UTC


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- part 1: per-ticket computation ----------------------------------------------------------

BERLIN = CalendarSettings(
    timezone="Europe/Berlin",
    hours=dict.fromkeys(("mon", "tue", "wed", "thu", "fri"), ("09:00-12:00", "13:00-17:00")),
    country="DE", subdivision="BE", closures=("12-24",),
)


def per_ticket(seconds: float) -> None:
    cal = Calendar.from_settings(BERLIN)
    policy = Policy("standard", "berlin", cal, {
        "first_response": parse_target("4h"), "update": parse_target("1wd"),
        "solution": parse_target("5wd")}, 0.75)
    rng = random.Random(6)
    year = dt.datetime(2026, 1, 1, tzinfo=UTC)
    starts = [year + dt.timedelta(minutes=rng.randrange(365 * 24 * 60)) for _ in range(500)]

    def fresh(t: dt.datetime) -> Facts:
        return Facts(origin=t, state="new", unanswered_since=t)

    def answered(t: dt.datetime) -> Facts:
        reply = t + dt.timedelta(hours=3)
        return Facts(origin=t, state="open", first_response_at=reply,
                     last_agent_reply_at=reply, unanswered_since=reply + dt.timedelta(hours=20))

    def paused(t: dt.datetime) -> Facts:
        pauses = tuple(Pause(t + dt.timedelta(days=d, hours=1), t + dt.timedelta(days=d, hours=30))
                       for d in range(0, 12, 3))
        return Facts(origin=t, state="open", first_response_at=t + dt.timedelta(hours=1),
                     last_agent_reply_at=t + dt.timedelta(hours=1), pauses=pauses)

    cases = [("new ticket (first response + solution)", fresh),
             ("answered, customer waiting (update + solution)", answered),
             ("answered, paused 4 times (update + solution)", paused)]
    print("Part 1: deadline computation per ticket (Berlin, lunch break, holidays)")
    print(f"  {'case':<48} {'per ticket':>12} {'tickets/s':>12}")
    for name, make in cases:
        facts = [make(t) for t in starts]
        for f in facts:  # warm the calendar's caches, as in a running daemon
            compute(f, policy, f.origin + dt.timedelta(hours=2))
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            for f in facts:
                compute(f, policy, f.origin + dt.timedelta(hours=2))
            done += len(facts)
        elapsed = time.perf_counter() - began
        print(f"  {name:<48} {elapsed / done * 1e6:>9.1f} us {done / elapsed:>12,.0f}")

    # What the observer runs per change: policy lookup + the same computation.
    with tempfile.TemporaryDirectory() as tmp:
        settings = bench_settings(Path(tmp), "sqlite://", calendar="berlin")
        notifier = Notifier(settings, Templates(), Hooks())
        engine = SlaEngine(settings, None, notifier)  # type: ignore[arg-type]
        tickets = [Ticket(number=str(i), group="Hot", priority="normal", tags=[], state="new",
                          created_at=t, sla_started_at=t, unanswered_since=t, sla_pauses=[],
                          sla_fired={}) for i, t in enumerate(starts)]
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            for ticket in tickets:
                engine.schedule(ticket, ticket.created_at + dt.timedelta(hours=2))
            done += len(tickets)
        elapsed = time.perf_counter() - began
        print(f"  {'SlaEngine.schedule (policy lookup + compute)':<48}"
              f" {elapsed / done * 1e6:>9.1f} us {done / elapsed:>12,.0f}")


# --- part 2: the daemon over PostgreSQL -----------------------------------------------------


def bench_settings(tmp: Path, url: str, calendar: str = "always") -> Settings:
    rules = tmp / "rules"
    rules.mkdir(exist_ok=True)
    return parse_settings({
        "daemon": {"database_url": url, "secret": "bench-secret-0123456789",
                   "data_dir": str(tmp / "var"), "rules_dir": str(rules),
                   "message_id_domain": "helpdesk.bench"},
        "smtp": {"enabled": False},
        "outbound": {"maildir": str(tmp / "outbound")},
        "inbound": [{"address": "help@helpdesk.bench", "default_group": "Hot"}],
        "agents": [{"address": "agent@agents.bench"}],
        "groups": [{"name": "Hot", "agents": ["agent@agents.bench"], "calendar": calendar,
                    "sla": "bulk", "leads": ["lead@agents.bench"],
                    "escalation_mail_anytime": True}],
        "calendars": {
            "always": {"timezone": "UTC", "hours": dict.fromkeys(
                ("mon", "tue", "wed", "thu", "fri", "sat", "sun"), ("00:00-24:00",))},
            "berlin": BERLIN.model_dump(),
        },
        # 30 working days on a 24x7 calendar: due exactly 30 days after the origin.
        "sla": {"bulk": {"first_response": "30wd", "warning_share": 0}},
    }, base_dir=tmp, environ={})


COLUMNS = ("number", "subject", "state", "priority", "tags", "group", "customer",
           "customer_name", "channel", "inbound_address", "created_at", "updated_at",
           "escalation_level", "sla_name", "sla_started_at", "sla_pauses", "sla_fired",
           "unanswered_since", "first_response_due", "next_escalation_at")


def insert_tickets(url: str, day: str, label: str, dues: list[dt.datetime]) -> None:
    """COPY one open ticket per deadline in `dues`, numbered `<day><seq>`, subject `label`."""
    import psycopg

    plain = url.replace("postgresql+psycopg://", "postgresql://")
    month = dt.timedelta(days=30)
    with psycopg.connect(plain) as conn, conn.cursor() as cur:
        cols = ", ".join(f'"{c}"' for c in COLUMNS)
        with cur.copy(f"COPY tickets ({cols}) FROM STDIN") as copy:
            for i, due in enumerate(dues):
                origin = due - month
                naive = origin.replace(tzinfo=None)
                copy.write_row((
                    f"{day}{i:07d}", f"{label} {i}", "new", "normal", "[]", "Hot",
                    f"user{i}@users.bench", "", "email", "help@helpdesk.bench", naive, naive,
                    0, "bulk", naive, "[]", "{}", naive, due.replace(tzinfo=None),
                    due.replace(tzinfo=None)))
        conn.commit()
        cur.execute("ANALYZE tickets")
        conn.commit()


def spread(count: int, now: dt.datetime) -> list[dt.datetime]:
    """Deadlines spread over the next 30 days (none in the next minute)."""
    rng = random.Random(2026)
    month = 30 * 24 * 3600
    return [now + dt.timedelta(seconds=60 + rng.random() * month) for _ in range(count)]


class RowPoller(threading.Thread):
    """Records when each escalation outbox row first became visible (committed)."""

    def __init__(self, url: str, expect: int) -> None:
        super().__init__(daemon=True)
        self.engine = create_engine(url)
        self.expect = expect
        self.seen: dict[int, dt.datetime] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        last = 0
        with self.engine.connect() as conn:
            while not self.stop.is_set() and len(self.seen) < self.expect:
                rows = conn.execute(text(
                    "SELECT id, ticket_id FROM outbox WHERE kind = 'escalation' AND id > :last"
                    " ORDER BY id"), {"last": last}).all()
                conn.commit()
                stamp = dt.datetime.now(UTC)
                for row_id, ticket_id in rows:
                    self.seen.setdefault(ticket_id, stamp)
                    last = max(last, row_id)
                time.sleep(0.02)
        self.engine.dispose()


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (f"median {statistics.median(ordered) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms,"
            f" max {ordered[-1] * 1000:.0f} ms")


async def daemon_run(url: str, settings: Settings, hot: int,
                     hot_dues: list[dt.datetime]) -> dict[str, Any]:
    rss_before = rss_mib()
    t0 = time.perf_counter()
    app = App(settings, run_outbox=False)
    t_app = time.perf_counter()
    await app.start()
    t_started = time.perf_counter()
    await app.escalation.wait_passes(1)
    t_armed = time.perf_counter()
    armed_at = app.escalation.armed_at
    rss_after = rss_mib()
    poller = RowPoller(url, hot)
    poller.start()
    deadline = hot_dues[-1] + dt.timedelta(seconds=10)
    while len(poller.seen) < hot and dt.datetime.now(UTC) < deadline:
        await asyncio.sleep(0.1)
    poller.stop.set()
    poller.join()
    await app.stop()
    with connection(url) as conn:
        rows = conn.execute(text(
            "SELECT o.ticket_id, o.created_at, t.number FROM outbox o"
            " JOIN tickets t ON t.id = o.ticket_id WHERE o.kind = 'escalation'")).all()
        dues = dict(conn.execute(text(
            "SELECT id, first_response_due FROM tickets WHERE subject LIKE 'hot %'")).all())
    fired_lag = [(created - dues[tid]).total_seconds() for tid, created, _ in rows if tid in dues]
    visible_lag = [(poller.seen[tid] - dues[tid].replace(tzinfo=UTC)).total_seconds()
                   for tid in poller.seen if tid in dues]
    return {
        "construct_s": t_app - t0, "start_s": t_started - t_app, "armed_s": t_armed - t0,
        "armed_at": armed_at, "first_hot_due": hot_dues[0] if hot_dues else None,
        "rss_before": rss_before, "rss_after": rss_after, "rows": len(rows),
        "fired_lag": fired_lag, "visible_lag": visible_lag, "totals": app.escalation.totals,
    }


@contextmanager
def connection(url: str) -> Iterator[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


async def restart_run(settings: Settings) -> dict[str, Any]:
    began = time.perf_counter()
    app = App(settings, run_outbox=False)
    await app.start()
    await app.escalation.wait_passes(1, timeout=600)
    seconds = time.perf_counter() - began
    stats = app.escalation.last
    await app.stop()
    return {"seconds": seconds, "tickets": stats.tickets, "mails": stats.mails}


def database_part(count: int, hot: int, backlog: int) -> None:
    name = f"helpdeskd_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = bench_settings(Path(tmp), url)
            App(settings).engine.dispose()  # create the schema
            began = time.perf_counter()
            insert_tickets(url, "20261127", "bulk", spread(count - hot, dt.datetime.now(UTC)))
            insert_s = time.perf_counter() - began
            # The hot ones last, so that "5 s after start" is 5 s after start.
            start = dt.datetime.now(UTC)
            hot_dues = [start + dt.timedelta(seconds=5 + 10 * i / max(hot - 1, 1))
                        for i in range(hot)]
            insert_tickets(url, "20261128", "hot", hot_dues)
            print(f"\nPart 2: {count:,} open tickets in PostgreSQL (COPY in {insert_s:.1f} s),"
                  f" {hot} of them due 5-15 s after start")
            result = asyncio.run(daemon_run(url, settings, hot, hot_dues))
            print(f"  daemon start to armed: {result['armed_s'] * 1000:.0f} ms"
                  f" (App() with schema check {result['construct_s'] * 1000:.0f} ms,"
                  f" start() {result['start_s'] * 1000:.0f} ms, first pass and arm the rest)")
            print(f"  armed at {result['armed_at']}, earliest hot deadline"
                  f" {result['first_hot_due']}")
            print(f"  memory (RSS): {result['rss_before']:.0f} MiB before, "
                  f"{result['rss_after']:.0f} MiB armed"
                  f" (+{result['rss_after'] - result['rss_before']:.0f} MiB)")
            print(f"  escalation mail rows: {result['rows']} of {hot};"
                  f" passes' totals {json.dumps(result['totals'].as_dict())}")
            print(f"  lag deadline -> row (pass clock): {summary(result['fired_lag'])}")
            print(f"  lag deadline -> row committed and visible: {summary(result['visible_lag'])}")
            if backlog:
                # A restart after downtime: `backlog` deadlines passed while nobody ran.
                overdue = [dt.datetime.now(UTC) - dt.timedelta(seconds=1 + i % 3600)
                           for i in range(backlog)]
                insert_tickets(url, "20261126", "overdue", overdue)
                restart = asyncio.run(restart_run(settings))
                rate = restart["tickets"] / restart["seconds"]
                print(f"  restart with {backlog:,} overdue: first pass fired"
                      f" {restart['tickets']:,} tickets ({restart['mails']:,} mail rows) in"
                      f" {restart['seconds']:.1f} s = {rate:,.0f} tickets/s, then armed")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", type=int, default=100_000)
    parser.add_argument("--hot", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per part-1 case")
    parser.add_argument("--backlog", type=int, default=2000,
                        help="overdue tickets for the restart figure (0: skip it)")
    parser.add_argument("--skip-db", action="store_true", help="part 1 only")
    args = parser.parse_args()
    # One log line per breach would drown the figures.
    logging.getLogger("gateway").setLevel(logging.ERROR)
    per_ticket(args.seconds)
    if not args.skip_db:
        database_part(args.tickets, args.hot, args.backlog)


if __name__ == "__main__":
    main()
