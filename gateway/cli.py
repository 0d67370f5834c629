"""`helpdeskd` sub-commands: init, run, check, rules explain, tickets, quarantine, outbox,
status.

Every command takes `--config PATH` (default `$HELPDESKD_CONFIG` or
`./helpdeskd.toml`; without either, the embedded demo defaults). Every `list`
and `show` takes `--json` with the stable field names documented in the README.
This is the only module that prints.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from gateway.config import (
    DEFAULT_SECRET,
    ConfigError,
    Settings,
    default_config_path,
    load_settings,
    with_real_secret,
)
from gateway.routing import RuleError

DEFAULTS = Path(__file__).resolve().parent / "defaults"


def _load(args: argparse.Namespace, *, create_secret: bool = True) -> Settings:
    """The settings `args` name; `create_secret=False` for commands that sign nothing
    (see `with_real_secret`), so that they leave no file behind."""
    given = getattr(args, "config", None)
    path = Path(given) if given else default_config_path()
    if not path.exists() and not given and "HELPDESKD_CONFIG" not in os.environ:
        # Embedded defaults: the shipped demo config, relative to the current directory.
        settings = load_settings(DEFAULTS / "helpdeskd.toml")
        settings = settings.model_copy(update={"base_dir": Path.cwd()})
        if not (Path.cwd() / settings.daemon.rules_dir).is_dir():
            # ...with the example rules shipped beside it when there are none here.
            daemon = settings.daemon.model_copy(update={"rules_dir": DEFAULTS / "rules"})
            settings = settings.model_copy(update={"daemon": daemon})
    else:
        settings = load_settings(path)
    return with_real_secret(settings, create=create_secret)


def _app(args: argparse.Namespace) -> Any:
    """The daemon's parts, for commands that read or repair its store.

    They never create an SQLite database: in the wrong directory, or with the wrong
    `--config`, an empty new database would answer "no tickets" where the operator
    should learn that this is not the daemon's store.
    """
    from gateway.daemon import App
    from gateway.store.db import is_sqlite, sqlite_file

    settings = _load(args, create_secret=False)
    url = settings.database_url
    if is_sqlite(url):
        path = sqlite_file(url)
        if path is not None and not path.exists():
            raise FileNotFoundError(
                f"no database at {path}: the daemon has not run with this configuration "
                "(helpdeskd run or helpdeskd init create it)")
    return App(with_real_secret(settings))


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False))


# -- commands --------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.directory)
    target.mkdir(parents=True, exist_ok=True)
    config = target / "helpdeskd.toml"
    if config.exists() and not args.force:
        print(f"{config} exists; use --force to overwrite", file=sys.stderr)
        return 1
    # A fresh deployment gets its own random reply-token secret, never the demo's.
    demo = (DEFAULTS / "helpdeskd.toml").read_text(encoding="utf-8")
    config.write_text(demo.replace(f'secret = "{DEFAULT_SECRET}"',
                                   f'secret = "{secrets.token_urlsafe(32)}"', 1),
                      encoding="utf-8")
    config.chmod(0o600)
    rules = target / "rules"
    rules.mkdir(exist_ok=True)
    for f in sorted((DEFAULTS / "rules").glob("*.yaml")):
        if not (rules / f.name).exists() or args.force:
            shutil.copyfile(f, rules / f.name)
    (target / "templates").mkdir(exist_ok=True)
    settings = load_settings(config)
    from gateway.daemon import App

    App(settings).engine.dispose()
    from gateway.store.db import redact_url

    print(f"initialised {target}: {config}, {rules}/, database "
          f"{redact_url(settings.database_url)}")
    return 0


def configure_logging(level: str) -> None:
    """The daemon's log lines: one format, and no secrets at any level."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request URL at INFO, and a Telegram Bot API URL contains the
    # bot's token, as does python-telegram-bot's own DEBUG output; aioimaplib at DEBUG
    # shows the LOGIN line; aiosmtpd logs every command at INFO, the reply-token
    # addresses in agents' RCPT TO included.
    for noisy in ("httpx", "httpcore", "aioimaplib", "telegram", "mail.log"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def cmd_run(args: argparse.Namespace) -> int:
    # Until `serve` installs its handlers, a reload request has nothing to reload and a
    # stop request has nothing to stop: neither may kill the process mid-start (the
    # import below alone takes a good part of a second).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_cleanly)
    from gateway.daemon import serve

    settings = _load(args)
    configure_logging(settings.daemon.log_level)
    logging.getLogger("gateway.daemon").info("helpdeskd: starting")
    # From here a SystemExit would land inside asyncio.run, between the loop's creation
    # and serve's own handlers (a traceback, a coroutine never awaited): a stop request
    # is only noted, and serve stops at once when its handlers are in place.
    early: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: early.append(signum))
    asyncio.run(serve(settings, stop_requested=lambda: bool(early)))
    return 0


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.routing import load_rules

    settings = _load(args, create_secret=False)
    rules = load_rules(settings.path(settings.daemon.rules_dir), settings.group_names)
    print(f"configuration OK: {len(settings.inbound)} inbound address(es), "
          f"{len(settings.groups)} group(s), {len(settings.agents)} agent(s), "
          f"{len(rules.rules)} rule(s) from {len(rules.files)} file(s)")
    channels = ["smtp" if settings.smtp.enabled else ""]
    channels += [f"imap:{m.name}" for m in settings.imap]
    channels += [f"telegram:{b.name}" for b in settings.telegram]
    print(f"channels: {', '.join(c for c in channels if c) or 'none'}")
    return 0


def cmd_rules_explain(args: argparse.Namespace) -> int:
    from gateway.mail.parse import ParseError, parse_mail
    from gateway.message import Channel
    from gateway.routing import RoutingFacts, load_rules

    settings = _load(args, create_secret=False)
    rules = load_rules(settings.path(settings.daemon.rules_dir), settings.group_names)
    raw = Path(args.file).read_bytes()
    try:
        mail = parse_mail(raw)
    except ParseError as exc:
        print(f"{args.file}: cannot be parsed: {exc.reason}: {exc.detail}", file=sys.stderr)
        return 1
    # B2: the envelope recipients decide, as in the daemon. A saved .eml has no envelope:
    # --rcpt gives it, else the delivery headers an MTA adds, else (a guess) To and Cc.
    candidates: list[tuple[str, list[str]]] = [
        ("--rcpt", args.rcpt or []),
        ("Delivered-To", mail.header_all("Delivered-To") + mail.header_all("X-Original-To")),
        ("To/Cc, a guess: give --rcpt", [a.address for a in (*mail.to, *mail.cc)]),
    ]
    source, recipients = next((c for c in candidates if c[1]), candidates[-1])
    inbound = settings.inbound_of(r.strip().strip("<>") for r in recipients)
    facts = RoutingFacts(
        subject=mail.subject, sender=mail.sender.address if mail.sender else "",
        to=tuple(a.address for a in mail.to), cc=tuple(a.address for a in mail.cc),
        body=mail.text, headers=mail.headers, channel=Channel.EMAIL.value, inbound=inbound,
    )
    decision = rules.evaluate(facts)
    group = decision.group
    why = "set by a rule"
    if group is None and inbound is not None:
        configured = settings.inbound_for(inbound)
        group = configured.default_group if configured else None
        why = f"default group of {inbound}"
    if args.json:
        _print_json({
            "subject": mail.subject, "inbound": inbound, "inbound_source": source,
            "group": group,
            "group_source": why, "drop": decision.drop, "drop_rule": decision.drop_rule,
            "priority": decision.priority or "normal", "type": decision.type,
            "tags": list(decision.tags),
            "trail": [{"rule": e.rule, "source": e.source, "matched": e.matched,
                       "detail": e.detail} for e in decision.trail],
        })
        return 0
    print(f"subject:  {mail.subject}")
    print(f"inbound:  {inbound} (from {source})")
    for e in decision.trail:
        print(f"  {'HIT ' if e.matched else 'miss'} {e.rule} ({e.source}): {e.detail}")
    if decision.drop:
        print(f"result:   DROP (rule {decision.drop_rule})")
    else:
        print(f"result:   group {group} ({why}), priority {decision.priority or 'normal'}"
              f"{', tags ' + ', '.join(decision.tags) if decision.tags else ''}")
    return 0


def _ticket_summary(t: Any, hooks: Any) -> dict[str, Any]:
    return {
        "number": t.number, "hook": hooks.format(t.number), "subject": t.subject,
        "state": t.state, "priority": t.priority, "group": t.group, "owner": t.owner,
        "customer": t.customer, "channel": t.channel, "tags": list(t.tags or []),
        "created_at": _iso(t.created_at), "updated_at": _iso(t.updated_at),
    }


def cmd_tickets_list(args: argparse.Namespace) -> int:
    from gateway.store.models import Ticket

    app = _app(args)
    with app.sessions() as s:
        q = select(Ticket).order_by(Ticket.id)
        if args.state:
            q = q.where(Ticket.state == args.state)
        if args.group:
            q = q.where(Ticket.group == args.group)
        rows = [_ticket_summary(t, app.hooks) for t in s.scalars(q)]
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            print(f"{r['hook']:<24} {r['state']:<8} {r['priority']:<7} {r['group']:<20} "
                  f"{r['customer']:<30} {r['subject']}")
        print(f"{len(rows)} ticket(s)")
    return 0


def ticket_detail(app: Any, number: str) -> dict[str, Any] | None:
    """The full JSON view of one ticket (also used by tests and the API)."""
    from gateway.store.models import Article, Ticket

    with app.sessions() as s:
        t = s.scalars(
            select(Ticket).where(Ticket.number == number).options(
                selectinload(Ticket.articles).selectinload(Article.attachments),
                selectinload(Ticket.participants), selectinload(Ticket.events))
        ).first()
        if t is None:
            return None
        linked = s.get(Ticket, t.linked_ticket_id) if t.linked_ticket_id else None
        data = _ticket_summary(t, app.hooks)
        data.update({
            "customer_name": t.customer_name, "inbound_address": t.inbound_address,
            "type": t.type, "escalation_level": t.escalation_level,
            "sla": t.sla_name, "major_at": _iso(t.major_at),
            "pending_until": _iso(t.pending_until),
            "linked_ticket": linked.number if linked else None,
            "first_response_at": _iso(t.first_response_at), "closed_at": _iso(t.closed_at),
            "deadlines": {
                "first_response_due": _iso(t.first_response_due),
                "update_due": _iso(t.update_due), "solution_due": _iso(t.solution_due),
                "next_escalation_at": _iso(t.next_escalation_at),
            },
            "participants": [{"address": p.address, "name": p.name, "role": p.role,
                              "bouncing": p.bouncing} for p in t.participants],
            "articles": [{
                "id": a.id, "kind": a.kind, "direction": a.direction, "channel": a.channel,
                "author_role": a.author_role, "sender": a.sender, "sender_name": a.sender_name,
                "subject": a.subject, "body": a.body, "message_id": a.message_id,
                "automatic": a.automatic, "created_at": _iso(a.created_at),
                "attachments": [{"filename": x.filename, "content_type": x.content_type,
                                 "size": x.size, "sha256": x.sha256} for x in a.attachments],
            } for a in t.articles],
            "events": [{"at": _iso(e.at), "actor": e.actor, "kind": e.kind, "data": e.data}
                       for e in t.events],
        })
        return data


def cmd_tickets_show(args: argparse.Namespace) -> int:
    app = _app(args)
    number = args.number.strip("[]").removeprefix(app.settings.daemon.ticket_hook)
    data = ticket_detail(app, number)
    if data is None:
        print(f"no ticket {args.number}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(data)
        return 0
    print(f"{data['hook']} {data['subject']}")
    print(f"  state {data['state']}, priority {data['priority']}, group {data['group']}, "
          f"owner {data['owner'] or '-'}, channel {data['channel']}")
    print(f"  customer {data['customer']}; created {data['created_at']}")
    if data["linked_ticket"]:
        print(f"  linked to {data['linked_ticket']}")
    for k, v in data["deadlines"].items():
        if v:
            print(f"  {k}: {v}")
    print("participants:")
    for p in data["participants"]:
        bounce = f" (bouncing: {p['bouncing']})" if p["bouncing"] else ""
        print(f"  {p['role']:<8} {p['address']}{bounce}")
    print("articles:")
    for a in data["articles"]:
        print(f"--- #{a['id']} {a['kind']} {a['direction']} from {a['sender']} "
              f"({a['author_role']}) {a['created_at']}")
        for x in a["attachments"]:
            print(f"    [attachment] {x['filename']} {x['content_type']} {x['size']} bytes")
        print("    " + a["body"].strip().replace("\n", "\n    "))
    print("events:")
    for e in data["events"]:
        print(f"  {e['at']} {e['actor']} {e['kind']} {json.dumps(e['data'], ensure_ascii=False)}")
    return 0


def _quarantine_row(q: Any) -> dict[str, Any]:
    return {"id": q.id, "received_at": _iso(q.received_at), "channel": q.channel,
            "source": q.source, "stage": q.stage, "reason": q.reason, "detail": q.detail,
            "message_id": q.message_id, "mail_from": q.mail_from, "rcpt_tos": q.rcpt_tos,
            "state": q.state, "size": len(q.raw)}


def cmd_quarantine(args: argparse.Namespace) -> int:
    from gateway.message import Channel, Inbound
    from gateway.store.models import QuarantineRow

    app = _app(args)
    if args.action == "list":
        with app.sessions() as s:
            rows = [_quarantine_row(q) for q in s.scalars(
                select(QuarantineRow).order_by(QuarantineRow.id))]
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                print(f"{r['id']:>5} {r['received_at']} {r['state']:<7} {r['stage']}: "
                      f"{r['reason']} ({r['source']}, {r['size']} bytes)")
            print(f"{len(rows)} message(s)")
        return 0
    if args.id is None:
        print(f"quarantine {args.action} needs an ID", file=sys.stderr)
        return 2
    with app.sessions() as s:
        q = s.get(QuarantineRow, args.id)
        if q is None:
            print(f"no quarantined message {args.id}", file=sys.stderr)
            return 1
        data = _quarantine_row(q)
        raw = q.raw
        inbound = Inbound(channel=Channel(q.channel), raw=q.raw, received_at=q.received_at,
                          source=f"quarantine:{q.id}", mail_from=q.mail_from,
                          rcpt_tos=tuple(q.rcpt_tos), channel_message_id=q.channel_message_id)
    if args.action == "show":
        if args.json:
            data["raw"] = raw.decode("utf-8", "replace")
            _print_json(data)
        else:
            for k, v in data.items():
                print(f"{k}: {v}")
            print()
            sys.stdout.write(raw.decode("utf-8", "replace"))
        return 0
    # retry: run the message through the pipeline again; the old row is marked retried.
    result = app.intake.ingest_now(inbound)
    with app.sessions() as s, s.begin():
        row = s.get(QuarantineRow, args.id)
        if row is not None:
            row.state = "retried"
    out = {"id": args.id, "outcome": result.outcome.value, "ticket": result.ticket,
           "reason": result.reason}
    if args.json:
        _print_json(out)
    else:
        print(f"quarantine {args.id}: {result.outcome.value}"
              f"{' ticket ' + result.ticket if result.ticket else ''}"
              f"{' (' + result.reason + ')' if result.reason else ''}")
    return 0 if result.outcome.value != "quarantined" else 1


def cmd_outbox_list(args: argparse.Namespace) -> int:
    from gateway.store.models import OutboxRow, Ticket

    app = _app(args)
    with app.sessions() as s:
        q = select(OutboxRow, Ticket.number).outerjoin(
            Ticket, Ticket.id == OutboxRow.ticket_id).order_by(OutboxRow.id)
        if args.state:
            q = q.where(OutboxRow.state == args.state)
        rows = [{
            "id": o.id, "ticket": number, "channel": o.channel, "kind": o.kind,
            "recipient": o.to_address, "recipients": o.recipients, "state": o.state,
            "attempts": o.attempts, "next_attempt_at": _iso(o.next_attempt_at),
            "last_error": o.last_error, "message_id": o.message_id,
            "created_at": _iso(o.created_at), "sent_at": _iso(o.sent_at),
        } for o, number in s.execute(q)]
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            print(f"{r['id']:>6} {r['state']:<7} {r['channel']:<8} {r['kind']:<8} "
                  f"{r['ticket'] or '-':<15} {r['recipient']}"
                  f"{'  ' + r['last_error'] if r['last_error'] else ''}")
        print(f"{len(rows)} row(s)")
    return 0


def imap_status(settings: Settings, sessions: Any) -> list[dict[str, Any]]:
    """Health of each configured [[imap]] mailbox, as the daemon last wrote it.

    The daemon updates `imap_state` on connect, after each drain and on every
    error, and sets `connected` false when it stops; a daemon that died keeps
    its last word, so `updated_at` says how old the information is.
    """
    from gateway.store.models import ImapState

    with sessions() as s:
        rows = {r.name: r for r in s.scalars(select(ImapState))}
    out = []
    for m in settings.imap:
        r = rows.get(m.name)
        out.append({
            "name": m.name, "address": m.address,
            "server": f"{m.host}:{m.effective_port}", "user": m.user, "folder": m.folder,
            "connected": bool(r and r.connected), "mode": (r.mode if r else "") or None,
            "ingested": r.ingested if r else 0, "failures": r.failures if r else 0,
            "last_success_at": _iso(r.last_success_at) if r else None,
            "last_error": r.last_error if r else None,
            "last_error_at": _iso(r.last_error_at) if r else None,
            "uidvalidity": r.uidvalidity if r else None, "last_uid": r.last_uid if r else 0,
            "updated_at": _iso(r.updated_at) if r else None,
        })
    return out


def spool_status(sessions: Any) -> dict[str, Any]:
    """SMTP mail answered 250 under a burst whose tickets are still to be made."""
    from sqlalchemy import func

    from gateway.store.models import SpoolRow

    with sessions() as s:
        waiting, oldest = s.execute(
            select(func.count(), func.min(SpoolRow.received_at))).one()
    return {"waiting": int(waiting or 0), "oldest_received_at": _iso(oldest)}


def cmd_status(args: argparse.Namespace) -> int:
    app = _app(args)
    mailboxes = imap_status(app.settings, app.sessions)
    spooled = spool_status(app.sessions)
    app.engine.dispose()
    if args.json:
        _print_json({"imap": mailboxes, "spool": spooled})
        return 0
    if spooled["waiting"]:
        print(f"spool: {spooled['waiting']} message(s) accepted under a burst wait for "
              f"their tickets (oldest received {spooled['oldest_received_at']}); the "
              f"daemon makes them as soon as it can, or at its next start")
    else:
        print("spool: empty (every accepted message has its ticket)")
    if not mailboxes:
        print("no [[imap]] mailboxes configured")
    for r in mailboxes:
        if r["updated_at"] is None:
            state = "never connected"
        else:
            state = f"connected ({r['mode']})" if r["connected"] else "not connected"
        print(f"imap {r['name']} ({r['user']} on {r['server']}, folder {r['folder']}) for "
              f"{r['address']}: {state}; {r['ingested']} ingested; "
              f"last success {r['last_success_at'] or '-'}")
        if r["last_error"]:
            print(f"  last error {r['last_error_at']}: {r['last_error']}"
                  f"{' (' + str(r['failures']) + ' in a row)' if r['failures'] else ''}")
        if r["updated_at"] is not None:
            print(f"  as of {r['updated_at']}")
    return 0


# -- escalation (issue 6; the views live in gateway.escalation.report) ------------------


#: `calendar show --days` at most ten years: each date is planned and printed.
MAX_SHOW_DAYS = 3660


def _day_count(text: str) -> int:
    """argparse type of `--days`: a usage error, not a traceback, for -1 or 'x'."""
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if not 0 <= days <= MAX_SHOW_DAYS:
        raise argparse.ArgumentTypeError(
            f"{days} is out of range: 0 to {MAX_SHOW_DAYS} days (ten years)")
    return days


def cmd_calendar_show(args: argparse.Namespace) -> int:
    from gateway.escalation.calendar import Calendar
    from gateway.escalation.report import calendar_view, format_calendar

    settings = _load(args, create_secret=False)
    table = settings.calendars.get(args.name)
    if table is None:
        names = ", ".join(sorted(settings.calendars)) or "none configured"
        print(f"no calendar {args.name!r} (calendars: {names})", file=sys.stderr)
        return 1
    cal = Calendar.from_settings(table)
    start = args.start or dt.datetime.now(cal.tz).date()
    view = calendar_view(args.name, cal, start, args.days)
    if args.json:
        _print_json(view)
    else:
        print("\n".join(format_calendar(view)))
    return 0


def _ticket_number(app: Any, text: str) -> str:
    return str(text.strip("[]").removeprefix(app.settings.daemon.ticket_hook))


def cmd_sla_explain(args: argparse.Namespace) -> int:
    from gateway.escalation.report import format_explain, sla_explain

    app = _app(args)
    data = sla_explain(app.sla, app.sessions, _ticket_number(app, args.number), app.clock())
    if data is None:
        print(f"no ticket {args.number}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(data)
    else:
        print("\n".join(format_explain(data)))
    return 0


def cmd_sla_stats(args: argparse.Namespace) -> int:
    from gateway.escalation.report import format_prometheus, format_stats, sla_stats

    app = _app(args)
    since = (dt.datetime.combine(args.since, dt.time(), dt.UTC) if args.since else None)
    data = sla_stats(app.sessions, app.clock(), since)
    if args.json:
        _print_json(data)
    elif args.prometheus:
        print("\n".join(format_prometheus(data)))
    else:
        print("\n".join(format_stats(data)))
    return 0


def cmd_incidents(args: argparse.Namespace) -> int:
    from gateway.escalation.report import format_review, incident_list, incident_reviews

    app = _app(args)
    if args.action == "list":
        rows = incident_list(app.sessions)
        if args.json:
            _print_json(rows)
        else:
            for r in rows:
                print(f"{r['ticket']:<15} {r['state']:<8} {r['group']:<20} since {r['major_at']}"
                      f"{' closed ' + r['closed_at'] if r['closed_at'] else ''}"
                      f" reviews {r['reviews'] or '-'}  {r['subject']}")
            print(f"{len(rows)} major incident(s)")
        return 0
    if not args.number:
        print("incidents review needs a ticket number", file=sys.stderr)
        return 2
    reviews = incident_reviews(app.sessions, _ticket_number(app, args.number))
    if reviews is None:
        print(f"no ticket {args.number}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(reviews)
    elif not reviews:
        print(f"{args.number}: no review yet (written when a major incident closes)")
    else:
        print("\n\n".join("\n".join(format_review(r)) for r in reviews))
    return 0


# -- argument parsing -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: `helpdeskd --config X run` and `helpdeskd run --config X` both work; a
    # sub-command's unset option must not overwrite the top-level one with None.
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="configuration file (default: $HELPDESKD_CONFIG or ./helpdeskd.toml)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable output")

    p = argparse.ArgumentParser(prog="helpdeskd", parents=[common],
                                description="Email-and-chat ticketing gateway daemon.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", parents=[common], help="write a working config, rules, database")
    s.add_argument("directory", nargs="?", default=".")
    s.add_argument("--force", action="store_true", help="overwrite existing files")
    s.set_defaults(func=cmd_init)

    sub.add_parser("run", parents=[common], help="run the daemon").set_defaults(func=cmd_run)
    sub.add_parser("check", parents=[common], help="validate config and rules").set_defaults(
        func=cmd_check)

    rules = sub.add_parser("rules", help="routing rules").add_subparsers(dest="rules_cmd",
                                                                          required=True)
    s = rules.add_parser("explain", parents=[common, as_json],
                         help="which rule matches FILE.eml and why")
    s.add_argument("file")
    s.add_argument("--rcpt", action="append", metavar="ADDRESS",
                   help="envelope recipient (repeatable): decides the inbound address, "
                        "as in the daemon")
    s.set_defaults(func=cmd_rules_explain)

    tickets = sub.add_parser("tickets", help="tickets").add_subparsers(dest="tickets_cmd",
                                                                        required=True)
    s = tickets.add_parser("list", parents=[common, as_json], help="all tickets")
    s.add_argument("--state")
    s.add_argument("--group")
    s.set_defaults(func=cmd_tickets_list)
    s = tickets.add_parser("show", parents=[common, as_json], help="one ticket in full")
    s.add_argument("number")
    s.set_defaults(func=cmd_tickets_show)

    s = sub.add_parser("quarantine", parents=[common, as_json],
                       help="messages that could not be processed")
    s.add_argument("action", choices=["list", "show", "retry"])
    s.add_argument("id", nargs="?", type=int)
    s.set_defaults(func=cmd_quarantine)

    outbox = sub.add_parser("outbox", help="outgoing messages").add_subparsers(
        dest="outbox_cmd", required=True)
    s = outbox.add_parser("list", parents=[common, as_json], help="every outbox row")
    s.add_argument("--state", choices=["pending", "sent", "held", "dead"])
    s.set_defaults(func=cmd_outbox_list)

    s = sub.add_parser("status", parents=[common, as_json],
                       help="health of the channels (IMAP mailboxes), as the daemon last wrote it")
    s.set_defaults(func=cmd_status)

    calendar = sub.add_parser("calendar", help="business-hours calendars").add_subparsers(
        dest="calendar_cmd", required=True)
    s = calendar.add_parser("show", parents=[common, as_json],
                            help="business hours and the holidays a calendar skips")
    s.add_argument("name")
    s.add_argument("--from", dest="start", type=dt.date.fromisoformat, metavar="DATE",
                   help="first date, YYYY-MM-DD (default: today in the calendar's zone)")
    s.add_argument("--days", type=_day_count, default=14,
                   help=f"number of days, 0 to {MAX_SHOW_DAYS} (default 14)")
    s.set_defaults(func=cmd_calendar_show)

    sla = sub.add_parser("sla", help="SLA deadlines").add_subparsers(dest="sla_cmd",
                                                                     required=True)
    s = sla.add_parser("explain", parents=[common, as_json],
                       help="each deadline of a ticket and how it was computed")
    s.add_argument("number")
    s.set_defaults(func=cmd_sla_explain)
    s = sla.add_parser("stats", parents=[common, as_json],
                       help="counts of warnings, breaches, escalations (audit events)")
    s.add_argument("--since", type=dt.date.fromisoformat, metavar="DATE",
                   help="count events from this date (UTC) on")
    s.add_argument("--prometheus", action="store_true", help="Prometheus text format")
    s.set_defaults(func=cmd_sla_stats)

    s = sub.add_parser("incidents", parents=[common, as_json],
                       help="major incidents and their review records")
    s.add_argument("action", choices=["list", "review"])
    s.add_argument("number", nargs="?")
    s.set_defaults(func=cmd_incidents)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except RuleError as exc:
        print(f"rules: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `helpdeskd tickets list --json | head`: the reader has what it wanted.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # a file named on the command line, a port in use
        print(f"helpdeskd: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:
        # One line: the driver's own message names host and port, never the password.
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"helpdeskd: database error: {reason}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
