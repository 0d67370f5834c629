"""Shared fixtures: a demo configuration, a database per backend, a running daemon.

Database tests run on SQLite and, when the PostgreSQL at 127.0.0.1:5432 answers,
on PostgreSQL too (a scratch database created for the run, emptied between tests).
The running daemon talks real SMTP on loopback: its own listener on a free port
and an aiosmtpd sink playing the smarthost.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from support.app import BACKENDS, PG, PG_ADMIN_URL, Clock, demo_config, truncate
from support.sink import SmtpSink

from gateway.config import Settings, parse_settings
from gateway.daemon import App
from gateway.mail.transport import SmtpTransport
from gateway.store.db import make_engine, migrate


def pytest_configure(config: pytest.Config) -> None:
    # In CI the PostgreSQL runs are part of the contract: never let them vanish silently.
    if os.environ.get("CI") and not PG:
        raise pytest.UsageError(f"CI: no PostgreSQL answers at {PG_ADMIN_URL}")


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


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'helpdeskd.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    truncate(url)
    return url


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return parse_settings(demo_config(tmp_path, db_url), base_dir=tmp_path, environ={})


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
