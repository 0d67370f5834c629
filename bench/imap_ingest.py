"""IMAP ingest figures: drain N messages appended to a real Dovecot mailbox.

Starts Dovecot (tests/support/dovecot.py) on a free loopback port, APPENDs N
messages to one mailbox, then measures, in the same run:

1. helpdeskd: an in-process daemon (`App`) with one [[imap]] mailbox on a fresh
   SQLite database, outbound mail to a maildir (acknowledgements and agent
   notifications are composed, committed in the outbox and written; nothing
   leaves the machine). Messages/second from start until the last message is
   committed and moved; the largest batch fetched; then the latency of single
   messages under IDLE, from APPEND until the ticket is committed.
2. django-helpdesk's `get_email` on the same mailbox refilled with the same
   messages, if a virtualenv with `django-helpdesk` exists (`--django-venv`,
   default /tmp/dh-venv; make one with `python3 -m venv /tmp/dh-venv &&
   /tmp/dh-venv/bin/pip install django-helpdesk pinax-teams django-user-accounts
   pinax-invitations`; its migrations need the last three). Its notifications go
   to Django's in-memory mail backend. Otherwise it says why it was not measured.

    .venv/bin/python bench/imap_ingest.py [--messages 2000] [--batch-size 50]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from sqlalchemy import func, select  # noqa: E402
from support.dovecot import Dovecot  # noqa: E402

from gateway.channels.imap import ImapChannel  # noqa: E402
from gateway.config import parse_settings  # noqa: E402
from gateway.daemon import App, freeze_startup_objects  # noqa: E402
from gateway.store.models import OutboxRow, Ticket  # noqa: E402


def message(i: int, tag: str) -> bytes:
    msg = EmailMessage()
    # One sender per message: every message gets an acknowledgement (no rate limit).
    msg["From"] = f"User {i} <user{i}@{tag}.users.test>"
    msg["To"] = "help@helpdesk.test"
    msg["Subject"] = f"Benchmark request {i}: cannot access the catalogue"
    msg["Message-ID"] = f"<bench-{tag}-{i}-{time.time_ns()}@users.test>"
    msg["Date"] = "Fri, 27 Nov 2026 10:00:00 +0000"
    msg.set_content("Hello,\n\n" + "I cannot access the service since this morning.\n" * 20)
    return msg.as_bytes()


def append_all(server: Dovecot, messages: list[bytes]) -> float:
    started = time.perf_counter()
    with server.client("help") as imap:
        for raw in messages:
            typ, data = imap.append("INBOX", None, None, raw)
            if typ != "OK":
                raise RuntimeError(f"APPEND failed: {data!r}")
    return time.perf_counter() - started


def settings_for(work: Path, server: Dovecot, batch_size: int) -> Any:
    (work / "rules").mkdir(parents=True, exist_ok=True)
    data = {
        "daemon": {"data_dir": str(work / "var"), "rules_dir": str(work / "rules"),
                   "secret": "bench-secret-0123456789abcdef",
                   "message_id_domain": "helpdesk.test"},
        "smtp": {"enabled": False},
        "outbound": {"maildir": str(work / "outbound")},
        "inbound": [{"address": "help@helpdesk.test", "default_group": "First Line"}],
        "agents": [{"address": "alice@agents.test", "name": "Alice"}],
        "groups": [{"name": "First Line", "agents": ["alice@agents.test"]}],
        "imap": [{"name": "help", "address": "help@helpdesk.test", "host": server.host,
                  "port": server.port, "tls": "plain", "allow_plaintext": True,
                  "user": "help", "password": server.users["help"],
                  "batch_size": batch_size}],
    }
    return parse_settings(data, base_dir=work, environ={})


async def wait_for(check: Any, limit: float) -> None:
    deadline = time.perf_counter() + limit
    while not check():
        if time.perf_counter() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.005)


async def run_helpdeskd(server: Dovecot, work: Path, n: int, batch_size: int,
                        samples: int, deliver: bool) -> dict[str, Any]:
    app = App(settings_for(work, server, batch_size), run_outbox=deliver)

    def tickets() -> int:
        with app.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Ticket)) or 0)

    freeze_startup_objects()  # as `helpdeskd run` does before it starts
    last = server.uidnext("help") - 1  # the drain is done when this UID is moved
    started = time.perf_counter()
    await app.start()
    channel = next(c for c in app.channels if isinstance(c, ImapChannel))
    # In memory: polling the database from here would compete with the writer.
    await wait_for(lambda: channel.position.acked_uid >= last, limit=600)
    drained = time.perf_counter() - started
    with app.sessions() as s:
        outbox = int(s.scalar(select(func.count()).select_from(OutboxRow)) or 0)
    result: dict[str, Any] = {
        "seconds": drained, "tickets": tickets(), "outbox_rows": outbox,
        "batches": channel.stats.batches,
        "max_batch_messages": channel.stats.max_batch_messages,
        "max_batch_bytes": channel.stats.max_batch_bytes,
    }
    # Latency under IDLE: one message at a time, from APPEND to the committed ticket.
    latencies = []
    for i in range(samples):
        before = channel.health.ingested
        raw = message(i, "latency")
        t0 = time.perf_counter()
        await asyncio.to_thread(server.append, "help", raw)
        await wait_for(lambda before=before: channel.health.ingested > before, limit=30)
        latencies.append(time.perf_counter() - t0)
    result["idle_latencies"] = latencies
    result["mode"] = channel.health.mode
    await app.stop()
    return result


DJANGO_SETTINGS = """
SECRET_KEY = "bench"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
    "django.contrib.sessions", "django.contrib.messages", "django.contrib.sites",
    "django.contrib.humanize", "rest_framework", "account", "pinax.invitations",
    "pinax.teams", "helpdesk",
]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": DB}}
SITE_ID = 1
ROOT_URLCONF = "dh_urls"
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
DEFAULT_FROM_EMAIL = "help@helpdesk.test"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates",
              "APP_DIRS": True, "OPTIONS": {"context_processors": [
                  "django.contrib.auth.context_processors.auth",
                  "django.contrib.messages.context_processors.messages",
                  "django.template.context_processors.request"]}}]
MIDDLEWARE = []
"""

DJANGO_DRIVER = """
import json, os, sys, time, logging
sys.path.insert(0, os.path.dirname(__file__))
os.environ["DJANGO_SETTINGS_MODULE"] = "dh_settings"
import django
django.setup()
logging.disable(logging.CRITICAL)
from django.core import mail
from django.core.management import call_command
call_command("migrate", verbosity=0)
from helpdesk.models import Queue, Ticket
Queue.objects.create(
    title="Help", slug="help", email_address="help@helpdesk.test",
    allow_email_submission=True, email_box_type="imap", email_box_host=sys.argv[1],
    email_box_port=int(sys.argv[2]), email_box_ssl=False, email_box_user="help",
    email_box_pass=sys.argv[3], email_box_imap_folder="INBOX",
    new_ticket_cc="alice@agents.test", logging_type="none")
started = time.perf_counter()
call_command("get_email", quiet=True)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "tickets": Ticket.objects.count(),
                  "mails": len(getattr(mail, "outbox", []))}))
"""


def run_django_helpdesk(server: Dovecot, work: Path, venv: Path) -> dict[str, Any] | str:
    python = venv / "bin" / "python"
    if not python.exists():
        return f"not measured: no virtualenv at {venv} (see this file's docstring)"
    probe = subprocess.run([str(python), "-c", "import helpdesk, django"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"not measured: django-helpdesk is not importable in {venv}"
    folder = work / "django"
    folder.mkdir()
    db = folder / "dh.sqlite3"
    (folder / "dh_settings.py").write_text(f"DB = {str(db)!r}\n" + DJANGO_SETTINGS)
    (folder / "dh_urls.py").write_text(
        "from django.urls import include, path\n"
        "urlpatterns = [path('helpdesk/', include('helpdesk.urls', namespace='helpdesk'))]\n")
    (folder / "driver.py").write_text(textwrap.dedent(DJANGO_DRIVER))
    done = subprocess.run(
        [str(python), str(folder / "driver.py"), server.host, str(server.port),
         server.users["help"]], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}"
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def report(label: str, n: int, ours: dict[str, Any]) -> float:
    rate: float = n / ours["seconds"]
    print(f"helpdeskd ({label}): drained {n} in {ours['seconds']:.2f}s = {rate:,.0f} messages/s "
          f"({ours['tickets']} tickets, {ours['outbox_rows']} outbox rows; "
          f"{ours['batches']} batches, largest {ours['max_batch_messages']} messages / "
          f"{ours['max_batch_bytes']:,} bytes)")
    lat = sorted(ours["idle_latencies"])
    if lat:
        print(f"helpdeskd: latency under {ours['mode'].upper()}, APPEND to committed ticket, "
              f"{len(lat)} samples: p50 {statistics.median(lat) * 1000:.0f} ms, "
              f"max {lat[-1] * 1000:.0f} ms (target: 2000 ms)")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", "-n", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--latency-samples", type=int, default=20)
    parser.add_argument("--django-venv", type=Path, default=Path("/tmp/dh-venv"))
    args = parser.parse_args()
    # The figures are the output; the daemon's own warnings are not.
    logging.basicConfig(level=logging.ERROR)
    n = args.messages
    with tempfile.TemporaryDirectory(prefix="helpdeskd-bench-imap-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # Dovecot's unprivileged processes must reach the mail below
        (work / "dovecot").mkdir()
        with Dovecot(work / "dovecot") as server:
            print(f"Dovecot {server.host}:{server.port}; {n} messages of "
                  f"~{len(message(0, 'x'))} bytes, each from its own sender; batch size "
                  f"{args.batch_size}; SQLite")
            seconds = append_all(server, [message(i, "a") for i in range(n)])
            print(f"APPEND (setup, one connection): {n / seconds:,.0f} messages/s")
            (work / "a").mkdir()
            ours = asyncio.run(run_helpdeskd(server, work / "a", n, args.batch_size, 0,
                                             deliver=False))
            rate = report("notifications enqueued, outbox worker off", n, ours)

            append_all(server, [message(i, "b") for i in range(n)])
            (work / "b").mkdir()
            ours = asyncio.run(run_helpdeskd(server, work / "b", n, args.batch_size,
                                             args.latency_samples, deliver=True))
            delivering = report("outbox worker writing them to a maildir meanwhile", n, ours)

            append_all(server, [message(i, "c") for i in range(n)])
            theirs = run_django_helpdesk(server, work, args.django_venv)
            if isinstance(theirs, str):
                print(f"django-helpdesk get_email: {theirs}")
                return
            their_rate = n / theirs["seconds"]
            print(f"django-helpdesk get_email: drained {n} in {theirs['seconds']:.2f}s = "
                  f"{their_rate:,.0f} messages/s ({theirs['tickets']} tickets, "
                  f"{theirs['mails']} mails sent to the in-memory backend; it deletes what "
                  "it ingested)")
            print(f"ratio: helpdeskd is {rate / their_rate:.1f}x django-helpdesk with "
                  f"notifications enqueued, {delivering / their_rate:.1f}x while also "
                  "delivering them (target: at least 10x)")


if __name__ == "__main__":
    main()
