"""The records database's schema as a history of Alembic revisions (`versions/`).

A memory applies the revisions it lacks when it opens, inside the transaction that opens it;
deployments that migrate separately run `memlayer db upgrade` and open with
`DatabaseOptions(migrate=False)`, which refuses a database that is behind instead of changing
it. Concurrent openers queue: SQLite's write lock, a transaction-scoped advisory lock on
PostgreSQL. Databases written before memlayer kept an Alembic version (0.1.0, 0.2.0) are
recognised by their layout and stamped with the revision they match, then upgraded.
The keyword and vector indexes over the records (FTS5, tsvector, HNSW) are built by their
retrievers, which create what is missing on open; the revisions own the tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from memlayer.errors import StorageError
from memlayer.stores.database import schema_lock

VERSION_TABLE = "memlayer_version"  # not alembic_version: the database may host an app's own
_HERE = Path(__file__).parent


def head() -> str:
    """The newest revision this release knows."""
    return str(_scripts().get_current_head())


def current(conn: Any) -> str | None:
    """The database's revision: its version table's, else the one its legacy layout matches,
    else None (an empty database)."""
    from alembic.runtime.migration import MigrationContext

    stamped = MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()
    return stamped or _legacy_revision(conn)


def upgrade(conn: Any, *, dim: int, keywords: Callable[[str], str]) -> str | None:
    """Bring the database to `head()` on `conn` (inside its transaction); returns the revision
    it was at. `dim` sizes the vector column of a new database; `keywords` derives a record's
    keyword string where a revision adds the column."""
    from alembic import command

    schema_lock(conn)
    before = current(conn)
    _check_known(before)
    if before == head():
        return before
    config = _config(conn, dim=dim, keywords=keywords)
    if before is not None and not _has_version_table(conn):
        command.stamp(config, before)
    command.upgrade(config, "head")
    return before


def require_head(conn: Any) -> None:
    """Refuse a database that is not at `head()` (for deployments that migrate separately)."""
    at = current(conn)
    _check_known(at)
    if at != head():
        raise StorageError(
            f"the records database is at schema revision {at or 'none (empty)'}, this release "
            f"needs {head()}: run `memlayer db upgrade` (or open with migrate=True)"
        )


def _check_known(revision: str | None) -> None:
    from alembic.util import CommandError

    if revision is None:
        return
    try:
        _scripts().get_revision(revision)
    except CommandError as exc:
        raise StorageError(
            f"the records database is at schema revision {revision!r}, which this release "
            f"does not know (newest: {head()}): it was written by a newer memlayer"
        ) from exc


def _legacy_revision(conn: Any) -> str | None:
    """0.1.0 kept no schema number (or 1), 0.2.0 wrote schema 2; on PostgreSQL a 0.2.x
    development layout already had the pgvector column."""
    from sqlalchemy import inspect

    inspector = inspect(conn)
    tables = set(inspector.get_table_names())
    if "records" not in tables:
        return None
    schema = None
    if "memlayer_settings" in tables:
        schema = conn.exec_driver_sql(
            "SELECT value FROM memlayer_settings WHERE key = 'schema'"
        ).scalar()
    if int(schema or 1) < 2:
        return "0001"
    if conn.dialect.name == "postgresql":
        kinds = {c["name"]: str(c["type"]) for c in inspector.get_columns("records")}
        if "BYTEA" not in kinds.get("embedding", "").upper():
            return "0003"
    return "0002"


def _has_version_table(conn: Any) -> bool:
    from sqlalchemy import inspect

    return VERSION_TABLE in inspect(conn).get_table_names()


def _config(conn: Any, **attributes: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.attributes.update(connection=conn, **attributes)
    return config


@lru_cache(maxsize=1)
def _scripts() -> Any:
    """The revisions on disk, read once per process (every open asks for the head)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(_HERE))


def stored_embedder(conn: Any) -> tuple[str, int] | None:
    """The (name, dim) a memory's database was created with, None for a new database."""
    from sqlalchemy import inspect

    if "memlayer_settings" not in inspect(conn).get_table_names():
        return None
    stored = conn.exec_driver_sql(
        "SELECT value FROM memlayer_settings WHERE key = 'embedder'"
    ).scalar()
    if not stored:
        return None
    created_with = json.loads(stored)
    return str(created_with["name"]), int(created_with["dim"])
