"""Engine, sessions and schema migrations for SQLite (embedded) and PostgreSQL.

SQLite runs in WAL mode with `synchronous=FULL`: a commit is on disk before the
daemon acknowledges a message to its source. The schema is owned by Alembic;
`migrate()` brings any database to the newest revision.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def redact_url(url: str) -> str:
    """A database URL fit for logs and output: the password masked, wherever it was."""
    try:
        parsed = make_url(url)
        secret_keys = {k: "***" for k in parsed.query if k.lower() in ("password", "pass")}
        if secret_keys:  # libpq also takes the password as a query parameter
            parsed = parsed.update_query_dict(secret_keys)
        return parsed.render_as_string(hide_password=True)
    except Exception:  # unparseable: say nothing about it rather than leak it
        return "<database url>"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite URL (options such as ?timeout=30 left out);
    None for an in-memory database."""
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


# How long a writer waits for SQLite's write lock, in this process (the queue below)
# and then across processes (busy_timeout), before its transaction fails.
BUSY_TIMEOUT_S = 10


def _queued_connection_class() -> type[sqlite3.Connection]:
    """A sqlite3 connection class whose transactions queue on one in-process lock.

    Every transaction here begins with BEGIN IMMEDIATE, which takes SQLite's write
    lock. When a second thread of the daemon (the outbox worker, say) asked while the
    intake writer held it, SQLite's busy handler put that thread to sleep in steps of
    1, 2, 5 ... 100 ms and it woke up long after the lock was free: even at 10
    messages/s an acknowledgement could take 670 ms. Threads of one process now wait on
    a lock that wakes the next waiter when the holder commits or rolls back.
    busy_timeout still handles another process (the CLI next to the daemon).
    One class per engine, so each database file has its own lock.
    """
    lock = threading.Lock()

    class QueuedConnection(sqlite3.Connection):
        holds = False

        def begin_immediate(self) -> None:
            if not lock.acquire(timeout=BUSY_TIMEOUT_S):
                raise sqlite3.OperationalError("database is locked (in-process writer queue)")
            self.holds = True
            try:
                self.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.release()
                raise

        def release(self) -> None:
            if self.holds:
                self.holds = False
                lock.release()

        # After, not before, COMMIT and ROLLBACK: the next writer must not ask
        # SQLite for the lock while this commit's fsync still holds it.
        def commit(self) -> None:
            try:
                super().commit()
            finally:
                self.release()

        def rollback(self) -> None:
            try:
                super().rollback()
            finally:
                self.release()

        def close(self) -> None:
            try:
                super().close()
            finally:
                self.release()

    return QueuedConnection


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the sqlite3 module, issue BEGIN: savepoints then work
    # (SQLAlchemy docs, "Serializable isolation / Savepoints / Transactional DDL").
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    # Writers queue for the lock instead of failing at once (CLI next to the daemon).
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front: a deferred transaction that reads
    # and then writes can fail with SQLITE_BUSY when another thread committed in
    # between, and busy_timeout cannot help there.
    conn.connection.dbapi_connection.begin_immediate()


def make_engine(url: str) -> Engine:
    """An engine for `url`; creates the SQLite file's directory if needed."""
    if is_sqlite(url):
        path = sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={
            "check_same_thread": False, "factory": _queued_connection_class()})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if url.startswith("postgresql://"):
        # psycopg 3 is the driver we ship.
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=5)


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest Alembic revision."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        # "heads": features may add independent migration branches off the same parent.
        command.upgrade(cfg, "heads")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on error."""
    with factory() as session, session.begin():
        yield session
