"""Shared fixtures: a demo configuration, a database per backend, a running daemon.

Database tests run on SQLite and, when the PostgreSQL at 127.0.0.1:5432 answers,
on PostgreSQL too (a scratch database created for the run, emptied between tests).
The running daemon talks real SMTP on loopback: its own listener on a free port
and an aiosmtpd sink playing the smarthost.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from support.sink import SmtpSink

from gateway.config import Settings, parse_settings
from gateway.daemon import App
from gateway.mail.transport import SmtpTransport
from gateway.store.db import make_engine, migrate
from gateway.store.models import Base

PG_ADMIN_URL = os.environ.get(
    "HELPDESKD_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _pg_reachable() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


PG = _pg_reachable()
BACKENDS = ["sqlite", "postgresql"] if PG else ["sqlite"]


def pytest_report_header(config: pytest.Config) -> str:
    return f"helpdeskd database backends: {', '.join(BACKENDS)}"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A scratch PostgreSQL database for this run, migrated once."""
    name = f"helpdeskd_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _truncate(url: str) -> None:
    engine = make_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'helpdeskd.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    _truncate(url)
    return url


DEMO_RULES = """\
rules:
  - name: catalogue
    when: {subject: {contains: "catalogue"}}
    then: {group: "Catalogue Support"}
  - name: spam
    when: {header: {name: X-Spam-Flag, equals: "YES"}}
    then: {drop: true}
  - name: urgent
    when: {subject: {regex: '\\burgent\\b'}}
    then: {priority: high}
"""


def demo_config(tmp_path: Path, db_url: str, **overrides: Any) -> dict[str, Any]:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "10-demo.yaml").write_text(DEMO_RULES)
    data: dict[str, Any] = {
        "daemon": {
            "name": "EOSC Helpdesk",
            "message_id_domain": "helpdesk.test",
            "data_dir": str(tmp_path / "var"),
            "database_url": db_url,
            "secret": "test-secret-0123456789abcdef",
            "rules_dir": str(rules),
        },
        "smtp": {"host": "127.0.0.1", "port": 0, "max_message_size": 200_000},
        "outbound": {"maildir": str(tmp_path / "outbound"), "backoff_seconds": 1},
        "inbound": [
            {"address": "help@helpdesk.test", "default_group": "First Line"},
            {"address": "catalogue@helpdesk.test", "default_group": "Catalogue Support"},
        ],
        "agents": [
            {"address": "alice@agents.test", "name": "Alice"},
            {"address": "bob@agents.test", "name": "Bob"},
            {"address": "carol@agents.test", "name": "Carol"},
        ],
        "groups": [
            {"name": "First Line", "agents": ["alice@agents.test"]},
            {"name": "Catalogue Support", "agents": ["bob@agents.test", "carol@agents.test"]},
            {"name": "Orders", "agents": []},
        ],
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return data


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return parse_settings(demo_config(tmp_path, db_url), base_dir=tmp_path, environ={})


class Clock:
    """A settable clock for the pipeline (no sleeping in tests)."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 27, 10, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += dt.timedelta(**kw)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    async with SmtpSink() as s:
        yield s


@pytest.fixture
async def app(settings: Settings, sink: SmtpSink, clock: Clock) -> AsyncIterator[App]:
    """A started daemon: SMTP listener on a free port, outbox to the sink."""
    transport = SmtpTransport("127.0.0.1", sink.port, starttls=False, username="",
                              password="", timeout=5)
    application = App(settings, clock=clock, transport=transport)
    await application.start()
    yield application
    await application.stop()
