"""One way to open a SQL database: SQLite file by default, any SQLAlchemy URL otherwise.

SQLite is opened in WAL mode with synchronous=FULL so that a committed transaction
survives `kill -9` and power loss; PostgreSQL needs nothing special.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memlayer.errors import InvalidInputError


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
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine
