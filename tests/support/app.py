"""Building blocks of the shared fixtures, importable by any test module.

(`from conftest import ...` is ambiguous: tests/routing has a conftest too.)
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from gateway.store.db import make_engine
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


def truncate(url: str) -> None:
    engine = make_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


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


class Clock:
    """A settable clock for the pipeline (no sleeping in tests)."""

    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 27, 10, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += dt.timedelta(**kw)
