"""Migration 0003_sla: its own branch off 0001, matching the models, reversible alone."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from gateway.store.db import MIGRATIONS, make_engine, migrate
from gateway.store.models import Base

SLA_COLUMNS = {"sla_name", "sla_started_at", "sla_pauses", "sla_fired", "unanswered_since",
               "last_agent_reply_at", "pending_until", "major_at"}


def config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def test_branches_off_0001() -> None:
    script = ScriptDirectory.from_config(config()).get_revision("0003_sla")
    assert script is not None and script.down_revision == "0001"


def mine(diff: object) -> bool:
    """A schema difference that touches what 0003_sla owns."""
    text = repr(diff)
    return "incident_reviews" in text or any(column in text for column in SLA_COLUMNS)


@contextmanager
def scratch(db_url: str) -> Iterator[str]:
    """A database of its own: the shared PostgreSQL test database is never downgraded."""
    if not db_url.startswith("postgresql"):
        yield db_url
        return
    name = f"helpdeskd_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(db_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield db_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_upgrade_matches_the_models_and_downgrade_undoes_only_this_branch(db_url: str) -> None:
    with scratch(db_url) as url:
        check(url)


def check(url: str) -> None:
    engine = make_engine(url)
    try:
        migrate(engine)
        with engine.connect() as conn:
            assert [d for d in compare_metadata(MigrationContext.configure(conn), Base.metadata)
                    if mine(d)] == []
        cfg = config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0003_sla@0001")
        columns = {c["name"] for c in inspect(engine).get_columns("tickets")}
        assert not columns & SLA_COLUMNS and "next_escalation_at" in columns
        assert "incident_reviews" not in inspect(engine).get_table_names()
        migrate(engine)  # and back up again
        assert {c["name"] for c in inspect(engine).get_columns("tickets")} >= SLA_COLUMNS
    finally:
        engine.dispose()
