"""What the escalation CLI commands show: calendars, one ticket's SLA, counts, incident reviews.

This module's sole purpose is to turn calendars, tickets and audit events into
JSON-ready dicts (the ``--json`` output and the API's view, field names stable)
and those dicts into text lines. It never prints: `gateway.cli` does.

The metrics (`sla_stats`) are counts of audit events in the shared database:
durable, the same whichever daemon fired, and exact across restarts -- not
in-process counters that reset and differ per instance.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any, Final

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from gateway.escalation.calendar import Calendar, describe_days
from gateway.escalation.engine import SlaEngine, counts_by_kind, facts_of, local_time
from gateway.escalation.sla import CLOCK_TITLES, ClockReport, compute
from gateway.store.models import Event, IncidentReview, Ticket

#: The audit event kinds the SLA engine writes; `sla stats` counts them.
METRIC_KINDS: Final[dict[str, str]] = {
    "sla-warning": "warnings sent (an SLA target reached its warning share)",
    "sla-breach": "breaches (one per clock that missed its deadline)",
    "escalated": "escalations (level + 1; moves and priority raises included)",
    "reminder": "reminders to customers while waiting for them",
    "closed-unsolved": "tickets closed after the customer never answered",
    "pending-reminder": "reminders to owners at a #pending time",
    "major-incident": "major incidents declared",
    "incident-review": "major-incident review records written",
}


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# --- calendar show -------------------------------------------------------------------------


def calendar_view(name: str, cal: Calendar, start: dt.date, days: int) -> dict[str, Any]:
    """``helpdeskd calendar show``: each date's hours, and the holidays it skips."""
    settings = cal.settings
    infos = describe_days(cal, start, days)
    return {
        "name": name, "timezone": settings.timezone, "country": settings.country,
        "subdivision": settings.subdivision, "from": start.isoformat(), "days": days,
        "business_minutes": sum(info.minutes for info in infos),
        "dates": [{
            "date": info.date.isoformat(), "weekday": info.weekday,
            "hours": [str(interval) for interval in info.intervals],
            "minutes": info.minutes, "closed": info.closed, "note": info.note,
        } for info in infos],
        "holidays": [{"date": info.date.isoformat(), "name": info.closed.split(": ", 1)[1]}
                     for info in infos if info.closed and info.closed.startswith("holiday: ")],
    }


def format_calendar(view: dict[str, Any]) -> list[str]:
    where = " ".join(str(v) for v in (view["country"], view["subdivision"]) if v)
    lines = [f"calendar {view['name']}: {view['timezone']}"
             f"{', holidays of ' + where if where else ''}",
             f"{view['from']} + {view['days']} day(s): {view['business_minutes']} business minutes"]
    for day in view["dates"]:
        hours = ", ".join(day["hours"]) if day["hours"] else "closed"
        why = day["closed"] or ""
        note = f" [{day['note']}]" if day["note"] else ""
        lines.append(f"  {day['date']} {day['weekday']}  {hours:<28} {day['minutes']:>5} min"
                     f"  {why}{note}".rstrip())
    if view["holidays"]:
        lines.append("holidays skipped:")
        lines += [f"  {h['date']} {h['name']}" for h in view["holidays"]]
    else:
        lines.append("no public holidays in this period")
    return lines


# --- sla explain ---------------------------------------------------------------------------


def _how(report: ClockReport, engine: SlaEngine, calendar_name: str, share: float) -> str:
    cal = engine.calendars[calendar_name]
    parts = [f"{report.target} ({report.target_minutes} business minutes) from"
             f" {local_time(report.start, cal)} ({report.start_reason})"
             f" in calendar {calendar_name} ({cal.settings.timezone})"]
    if report.paused_minutes:
        parts.append(f"{report.paused_minutes} business minutes paused")
    parts.append(f"{report.used_minutes} used")
    if report.status == "running":
        parts.append(f"due {local_time(report.due, cal)}")
        if report.warn_at is not None:
            parts.append(f"warning at {share:.0%} = {local_time(report.warn_at, cal)}")
    elif report.status == "paused":
        parts.append(f"paused with {report.remaining_minutes} business minutes left")
    elif report.status == "stopped":
        parts.append("stopped (ticket closed)")
    else:
        parts.append(f"{report.status} at {local_time(report.ended_at, cal)}")
    return "; ".join(parts)


def sla_explain(engine: SlaEngine, sessions: sessionmaker[Session], number: str,
                now: dt.datetime) -> dict[str, Any] | None:
    """``helpdeskd sla explain``: each deadline of one ticket and how it was computed."""
    with sessions() as session:
        ticket = session.scalars(select(Ticket).where(Ticket.number == number)).first()
        if ticket is None:
            return None
        policy, why = engine.policy_for(ticket)
        facts = facts_of(ticket)
        sched = compute(facts, policy, now, waiting=engine.waiting_policy(ticket),
                        fired=ticket.sla_fired or {})
        cal = policy.calendar if policy is not None else None
        fired = ticket.sla_fired or {}
        clocks = []
        for report in sched.clocks:
            assert policy is not None
            clocks.append({
                "clock": report.clock, "title": CLOCK_TITLES[report.clock],
                "target": report.target.text, "target_minutes": report.target_minutes,
                "start": _iso(report.start), "start_reason": report.start_reason,
                "status": report.status, "due": _iso(report.due),
                "warn_at": _iso(report.warn_at), "used_minutes": report.used_minutes,
                "paused_minutes": report.paused_minutes,
                "remaining_minutes": report.remaining_minutes,
                "ended_at": _iso(report.ended_at),
                "warning_fired": fired.get(f"{report.clock}:warning") == report.cycle,
                "breach_fired": fired.get(f"{report.clock}:breach") == report.cycle,
                "how": _how(report, engine, policy.calendar_name, policy.warning_share),
            })
        return {
            "ticket": ticket.number, "hook": engine.hooks.format(ticket.number),
            "now": now.isoformat(), "state": ticket.state, "group": ticket.group,
            "priority": ticket.priority, "escalation_level": ticket.escalation_level,
            "major_at": _iso(ticket.major_at),
            "sla": policy.name if policy is not None else None, "sla_why": why,
            "calendar": policy.calendar_name if policy is not None else None,
            "timezone": cal.settings.timezone if cal is not None else None,
            "warning_share": policy.warning_share if policy is not None else None,
            "origin": _iso(facts.origin), "origin_local": local_time(facts.origin, cal),
            "pauses": [[_iso(p.start), _iso(p.end)] for p in facts.pauses],
            "pauses_local": [[local_time(p.start, cal), local_time(p.end, cal)
                              if p.end is not None else None] for p in facts.pauses],
            "clocks": clocks,
            "alarms": [{"key": a.key, "kind": a.kind, "at": _iso(a.at),
                        "local": local_time(a.at, cal)} for a in sched.alarms],
            "stored": {
                "first_response_due": _iso(ticket.first_response_due),
                "update_due": _iso(ticket.update_due),
                "solution_due": _iso(ticket.solution_due),
                "next_escalation_at": _iso(ticket.next_escalation_at),
            },
        }


def format_explain(data: dict[str, Any]) -> list[str]:
    lines = [f"{data['hook']}  state {data['state']}, group {data['group']},"
             f" priority {data['priority']}, escalation level {data['escalation_level']}"
             f"{', MAJOR INCIDENT since ' + data['major_at'] if data['major_at'] else ''}"]
    if data["sla"] is None:
        lines.append(f"no SLA: {data['sla_why']}")
    else:
        lines.append(f"SLA {data['sla']} ({data['sla_why']}), calendar {data['calendar']}"
                     f" ({data['timezone']}), warning at {data['warning_share']:.0%}")
    lines.append(f"clock origin {data['origin_local']}; as of {data['now']}")
    for start, end in data["pauses_local"]:
        lines.append(f"  paused {start} .. {end or 'now'}")
    for clock in data["clocks"]:
        flags = [name for name, on in (("warning sent", clock["warning_fired"]),
                                       ("breached", clock["breach_fired"])) if on]
        lines.append(f"{clock['title']}: {clock['status']}"
                     f"{' (' + ', '.join(flags) + ')' if flags else ''}")
        lines.append(f"  {clock['how']}")
    if data["alarms"]:
        lines.append("next alarms:")
        lines += [f"  {a['local']}  {a['key']}" for a in data["alarms"]]
    else:
        lines.append("no alarms pending")
    return lines


# --- sla stats -----------------------------------------------------------------------------


def sla_stats(sessions: sessionmaker[Session], now: dt.datetime,
              since: dt.datetime | None = None) -> dict[str, Any]:
    """Counts of SLA audit events (all daemons, since the start or `since`) and open gauges."""
    with sessions() as session:
        counts = dict(counts_by_kind(session, METRIC_KINDS, since))
        per_clock: dict[str, Counter[str]] = {"sla-warning": Counter(), "sla-breach": Counter()}
        query = select(Event.kind, Event.data).where(Event.kind.in_(list(per_clock)))
        if since is not None:
            query = query.where(Event.at >= since)
        for kind, data in session.execute(query):
            per_clock[kind][str((data or {}).get("clock"))] += 1
        open_q = select(func.count(Ticket.id)).where(Ticket.state != "closed")
        overdue = or_(Ticket.first_response_due <= now, Ticket.update_due <= now,
                      Ticket.solution_due <= now)
        levels = session.execute(
            select(Ticket.escalation_level, func.count(Ticket.id))
            .where(Ticket.state != "closed").group_by(Ticket.escalation_level)).all()
        gauges = {
            "open_tickets": session.scalar(open_q) or 0,
            "open_with_deadline": session.scalar(
                open_q.where(Ticket.next_escalation_at.is_not(None))) or 0,
            "open_overdue": session.scalar(open_q.where(overdue)) or 0,
            "open_by_escalation_level": {str(level or 0): n for level, n in sorted(
                levels, key=lambda row: row[0] or 0)},
        }
    return {
        "now": now.isoformat(), "since": _iso(since),
        "counts": {kind: counts.get(kind, 0) for kind in METRIC_KINDS},
        "warnings_by_clock": dict(per_clock["sla-warning"]),
        "breaches_by_clock": dict(per_clock["sla-breach"]),
        "gauges": gauges,
    }


def format_stats(data: dict[str, Any]) -> list[str]:
    lines = [f"SLA audit events{' since ' + data['since'] if data['since'] else ''}"
             f" (all daemons sharing this database), as of {data['now']}:"]
    for kind, text in METRIC_KINDS.items():
        lines.append(f"  {data['counts'][kind]:>8}  {kind:<17} {text}")
    for title, key in (("warnings", "warnings_by_clock"), ("breaches", "breaches_by_clock")):
        if data[key]:
            lines.append(f"  {title} by clock: " + ", ".join(
                f"{clock} {n}" for clock, n in sorted(data[key].items())))
    g = data["gauges"]
    lines.append(f"open tickets {g['open_tickets']}, with a deadline {g['open_with_deadline']},"
                 f" overdue now {g['open_overdue']}")
    lines.append("open by escalation level: " + (", ".join(
        f"L{level} {n}" for level, n in g["open_by_escalation_level"].items()) or "-"))
    return lines


def format_prometheus(data: dict[str, Any]) -> list[str]:
    """The same figures in the Prometheus text format (for a node-exporter textfile)."""
    lines = ["# HELP helpdeskd_sla_events_total SLA audit events in the database, by kind.",
             "# TYPE helpdeskd_sla_events_total counter"]
    lines += [f'helpdeskd_sla_events_total{{kind="{kind}"}} {n}'
              for kind, n in data["counts"].items()]
    lines += ["# HELP helpdeskd_sla_breaches_total SLA breaches in the database, by clock.",
              "# TYPE helpdeskd_sla_breaches_total counter"]
    lines += [f'helpdeskd_sla_breaches_total{{clock="{clock}"}} {n}'
              for clock, n in sorted(data["breaches_by_clock"].items())]
    g = data["gauges"]
    lines += ["# HELP helpdeskd_open_tickets Open tickets.", "# TYPE helpdeskd_open_tickets gauge",
              f"helpdeskd_open_tickets {g['open_tickets']}",
              "# HELP helpdeskd_open_tickets_overdue Open tickets past an SLA deadline.",
              "# TYPE helpdeskd_open_tickets_overdue gauge",
              f"helpdeskd_open_tickets_overdue {g['open_overdue']}"]
    return lines


# --- incidents -----------------------------------------------------------------------------


def incident_list(sessions: sessionmaker[Session]) -> list[dict[str, Any]]:
    """Every major incident, open or closed, with its review records' ids."""
    with sessions() as session:
        tickets = session.scalars(
            select(Ticket).where(Ticket.major_at.is_not(None)).order_by(Ticket.major_at))
        out = []
        for t in tickets:
            reviews = list(session.scalars(select(IncidentReview.id).where(
                IncidentReview.ticket_id == t.id).order_by(IncidentReview.id)))
            out.append({"ticket": t.number, "subject": t.subject, "state": t.state,
                        "group": t.group, "priority": t.priority,
                        "major_at": _iso(t.major_at), "closed_at": _iso(t.closed_at),
                        "escalation_level": t.escalation_level, "reviews": reviews})
        return out


def incident_reviews(sessions: sessionmaker[Session], number: str) -> list[dict[str, Any]] | None:
    """The review records of one ticket (None: no such ticket), oldest first."""
    with sessions() as session:
        ticket_id = session.scalar(select(Ticket.id).where(Ticket.number == number))
        if ticket_id is None:
            return None
        rows = session.scalars(select(IncidentReview).where(
            IncidentReview.ticket_id == ticket_id).order_by(IncidentReview.id))
        return [{"id": r.id, "ticket": number, "major_at": _iso(r.major_at),
                 "closed_at": _iso(r.closed_at), "summary": r.summary, "timeline": r.timeline}
                for r in rows]


def format_review(review: dict[str, Any]) -> list[str]:
    s = review["summary"]
    lines = [f"review #{review['id']} of {review['ticket']}: {s.get('subject', '')}",
             f"  major incident {review['major_at']} .. closed {review['closed_at']}"
             f" ({s.get('minutes_open')} min), group {s.get('group')}, SLA {s.get('sla')},"
             f" level {s.get('escalation_level')}, warnings {s.get('warnings')},"
             f" breaches {s.get('breaches')}",
             "timeline:"]
    for item in review["timeline"]:
        detail = item["data"]
        text = (detail.get("excerpt", "").strip().splitlines() or [""])[0][:80] \
            if item["type"] == "article" else ", ".join(
                f"{k}={v}" for k, v in detail.items() if v not in (None, [], {}, ""))
        lines.append(f"  {item['at']}  {item['actor']:<24} {item['kind']:<28} {text}".rstrip())
    return lines
