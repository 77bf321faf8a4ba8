"""One way to open a SQL database: SQLite file by default, any SQLAlchemy URL otherwise.

SQLite is opened in WAL mode with synchronous=FULL so that a committed transaction
survives `kill -9` and power loss. Its write transactions begin IMMEDIATE (see `writer`), so
two processes writing one file queue on SQLite's lock instead of one failing when its read
snapshot goes stale; PostgreSQL needs nothing special.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from memlayer.errors import InvalidInputError

log = logging.getLogger(__name__)
# serialization failure, deadlock, server shutting down or starting (08xxx: connection lost)
_RETRIED_STATES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03"})
T = TypeVar("T")

_IMMEDIATE = "memlayer_immediate"
_SCHEMA_LOCK = 0x6D656D6C  # PostgreSQL advisory lock held while the schema changes ('meml')


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of a SQLite file."""
    return f"sqlite:///{path.resolve()}"


def open_engine(
    url: str,
    *,
    statement_timeout_s: float | None = None,
    pool_size: int = 5,
    **kwargs: Any,
) -> Any:
    """Create an Engine for `url`: crash-safe pragmas on SQLite; on PostgreSQL a pool of
    `pool_size` connections (twice that in overflow) checked before use, so a connection
    the server dropped is replaced instead of failing a call, and a server-side
    `statement_timeout` when given."""
    from sqlalchemy import create_engine, event
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise InvalidInputError("url", "must be a SQLAlchemy database URL", url) from exc
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
    elif parsed.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("pool_size", pool_size)
        kwargs.setdefault("max_overflow", 2 * pool_size)
        if statement_timeout_s:
            timeout_ms = max(1, int(statement_timeout_s * 1000))
            kwargs.setdefault("connect_args", {"options": f"-c statement_timeout={timeout_ms}"})
    try:
        engine = create_engine(parsed, **kwargs)
    except NoSuchModuleError as exc:
        raise InvalidInputError("url", "names a driver that is not installed", url) from exc
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # transactions are begun below, not by the driver
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            immediate = conn.get_execution_options().get(_IMMEDIATE, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def transient(error: BaseException | None) -> bool:
    """A PostgreSQL failure worth retrying the whole transaction for: the connection was lost
    or refused (server restart, network), or the server rolled the transaction back
    (serialization failure, deadlock). Never a statement timeout, a constraint violation or
    bad data. (SQLite's operational errors, a full disk or a lock held past the busy
    timeout, are not retried.)"""
    from sqlalchemy.exc import DBAPIError, OperationalError

    while error is not None and not isinstance(error, DBAPIError):
        error = error.__cause__
    if error is None:
        return False
    if error.connection_invalidated:
        return True
    state = getattr(error.orig, "sqlstate", None)
    if state is None:  # refused before any session: no SQLSTATE
        return isinstance(error, OperationalError)
    return state in _RETRIED_STATES or state.startswith("08")


def retrying(work: Callable[[], T], *, deadline_s: float) -> T:
    """Run `work` (one whole transaction), again after transient failures, with exponential
    backoff until `deadline_s` has passed; then the last failure is raised."""
    started = time.monotonic()
    pause = 0.05
    while True:
        try:
            return work()
        except Exception as error:
            if not transient(error) or time.monotonic() - started + pause > deadline_s:
                raise
            log.warning("retrying a write after a transient database failure: %s", error)
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def writer(engine: Any) -> Any:
    """The engine whose transactions take SQLite's write lock when they begin.

    A deferred transaction that reads and then writes fails with "database is locked" when
    another process committed in between; an immediate one waits its turn instead.
    """
    return engine.execution_options(**{_IMMEDIATE: True})


def schema_lock(conn: Any) -> None:
    """Hold the schema lock until `conn`'s transaction ends, so processes opening one database
    at once queue for DDL (`CREATE ... IF NOT EXISTS` run by two of them together collides
    in PostgreSQL's catalog instead of finding the other's table): a transaction-scoped
    advisory lock on PostgreSQL; SQLite's write transaction already excludes other writers."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")


def create_tables(engine: Any, metadata: Any) -> None:
    """Create `metadata`'s missing tables, under the schema lock."""
    with writer(engine).begin() as conn:
        schema_lock(conn)
        metadata.create_all(conn)
