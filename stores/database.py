"""One way to open a SQL database: SQLite file by default, any SQLAlchemy URL otherwise.

SQLite is opened in WAL mode with synchronous=FULL so that a committed transaction
survives `kill -9` and power loss. Its write transactions begin IMMEDIATE (see `writer`), so
two processes writing one file queue on SQLite's lock instead of one failing when its read
snapshot goes stale; PostgreSQL needs nothing special.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memlayer.errors import InvalidInputError

_IMMEDIATE = "memlayer_immediate"


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of a SQLite file."""
    return f"sqlite:///{path.resolve()}"


def open_engine(url: str, **kwargs: Any) -> Any:
    """Create an Engine for `url`, with crash-safe pragmas on SQLite."""
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


def writer(engine: Any) -> Any:
    """The engine whose transactions take SQLite's write lock when they begin.

    A deferred transaction that reads and then writes fails with "database is locked" when
    another process committed in between; an immediate one waits its turn instead.
    """
    return engine.execution_options(**{_IMMEDIATE: True})
