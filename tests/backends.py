"""The two databases a Memory runs on, for tests: a SQLite folder, and a real PostgreSQL with
pgvector (the `postgres_server` fixture of conftest.py: one pgserver per test session, a
fresh database per store)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def fresh_database(server: Any) -> str:
    """A new, empty database on `server`: its SQLAlchemy URL (psycopg 3)."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    head, _, query = base.partition("?")
    return f"{head.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


def location(backend: str, request: pytest.FixtureRequest, folder: Path) -> dict[str, Any]:
    """`Memory(**location(...))` keyword arguments for a new store on `backend` (`folder` is
    used by SQLite only)."""
    if backend == "postgres":
        return {"url": fresh_database(request.getfixturevalue("postgres_server"))}
    return {"path": folder}
