"""Shared setup for the escalation tests: an SLA configuration on top of the demo one.

Not a conftest (a second module named ``conftest`` shadows the root one when the
whole suite runs), so tests import it by its own name. The configuration is the
conftest ``settings`` fixture plus:

* calendar ``berlin``: Europe/Berlin, Mon-Fri 09:00-17:00, German (Berlin) holidays;
* SLA ``standard`` (First Line): first response 4h, update 1 working day, solution 5wd;
  ``l2`` (Catalogue Support): first response 2h, update 4h; ``major``: 30 minutes;
* escalation First Line -> Catalogue Support -> Orders, each with a lead.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from support.mailer import make_mail

from gateway.config import Settings, parse_settings
from gateway.daemon import App
from gateway.followup import make_token, reply_address
from gateway.message import Channel, Inbound
from gateway.pipeline import Disposition
from gateway.store.models import Event, OutboxRow, Ticket

BERLIN = ZoneInfo("Europe/Berlin")
LEAD1 = "lead1@agents.test"
LEAD2 = "lead2@agents.test"
INCIDENTS = "incidents@ops.test"


def berlin(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    """A Berlin wall time as a UTC instant (what the store and the clock use)."""
    return dt.datetime(year, month, day, hour, minute, tzinfo=BERLIN).astimezone(dt.UTC)


def sla_settings(settings: Settings, **changes: Any) -> Settings:
    """The demo settings with calendars, SLAs and escalation; `changes` override top keys.

    A `groups` entry in `changes` maps a group name to keys merged into that group.
    """
    data = settings.model_dump()
    data["calendars"] = {"berlin": {"timezone": "Europe/Berlin", "country": "DE",
                                    "subdivision": "BE"}}
    data["sla"] = {
        "standard": {"calendar": "berlin", "first_response": "4h", "update": "1wd",
                     "solution": "5wd"},
        "l2": {"calendar": "berlin", "first_response": "2h", "update": "4h"},
        "major": {"calendar": "berlin", "first_response": 30, "update": 60},
    }
    data["major_incidents"] = {"sla": "major", "notify": [INCIDENTS]}
    groups = {g["name"]: g for g in data["groups"]}
    groups["First Line"].update(calendar="berlin", sla="standard", leads=[LEAD1],
                                escalate_to="Catalogue Support")
    groups["Catalogue Support"].update(calendar="berlin", sla="l2", leads=[LEAD2],
                                       escalate_to="Orders")
    groups["Orders"].update(calendar="berlin")
    for name, keys in changes.pop("groups", {}).items():
        groups[name].update(keys)
    for key, value in changes.items():
        data[key] = value
    return parse_settings(data, base_dir=settings.base_dir, environ={})


def customer_mail(app: App, subject: str = "Portal down", body: str = "It is broken.\n",
                  **kw: Any) -> Disposition:
    """A customer's mail through the real pipeline (no SMTP), committed."""
    raw = make_mail(subject, body, **kw)
    to = kw.get("to", "help@helpdesk.test")
    return app.intake.ingest_now(Inbound(Channel.EMAIL, raw, app.clock(), "test",
                                         mail_from="dana@users.test", rcpt_tos=(to,)))


def agent_reply(app: App, number: str, body: str, agent: str = "alice@agents.test",
                inbound: str = "help@helpdesk.test") -> Disposition:
    """An agent's reply to the ticket's tokened address, as a mail client sends it."""
    secret = app.settings.daemon.secret.get_secret_value().encode()
    address = reply_address(inbound, number, make_token(secret, number, agent))
    raw = make_mail(f"Re: [Ticket#{number}] x", body, sender=agent, to=address)
    return app.intake.ingest_now(Inbound(Channel.EMAIL, raw, app.clock(), "test",
                                         mail_from=agent, rcpt_tos=(address,)))


def ticket_row(app: App, number: str) -> Ticket:
    with app.sessions() as s:
        t = s.scalars(select(Ticket).where(Ticket.number == number)).one()
        s.expunge(t)
        return t


def events(app: App, number: str, kind: str | None = None) -> list[Event]:
    with app.sessions() as s:
        q = select(Event).join(Ticket).where(Ticket.number == number).order_by(Event.id)
        if kind is not None:
            q = q.where(Event.kind == kind)
        rows = list(s.scalars(q))
        for r in rows:
            s.expunge(r)
        return rows


def outbox(app: App, kind: str | None = None, to: str | None = None) -> list[OutboxRow]:
    with app.sessions() as s:
        q = select(OutboxRow).order_by(OutboxRow.id)
        if kind is not None:
            q = q.where(OutboxRow.kind == kind)
        if to is not None:
            q = q.where(OutboxRow.to_address == to)
        rows = list(s.scalars(q))
        for r in rows:
            s.expunge(r)
        return rows


def count_events(app: App, kind: str) -> int:
    with app.sessions() as s:
        return int(s.scalar(select(func.count(Event.id)).where(Event.kind == kind)) or 0)
