"""The records database's schema revision, outside a `Memory`: what `memlayer db current`
reports and `memlayer db upgrade` applies, for deployments that migrate before they roll out
workers opened with `DatabaseOptions(migrate=False)`."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from memlayer.config import DatabaseOptions, Settings
from memlayer.embedders import resolve_embedder
from memlayer.memory import database_url, memory_folder
from memlayer.retrievers.keywords import index_text
from memlayer.stores import migrations
from memlayer.stores.database import open_engine
from memlayer.stores.records import RecordStore


class SchemaStatus(NamedTuple):
    """A database's schema revision (None: empty) and the newest this release knows."""

    revision: str | None
    head: str


def schema_status(path: str | Path | None = None, *, url: str | None = None) -> SchemaStatus:
    """The revision of the memory at `path` or `url` (the same rules as `Memory`)."""
    target = _target(path, url, Settings())
    engine = open_engine(target)
    try:
        with engine.connect() as conn:
            return SchemaStatus(migrations.current(conn), migrations.head())
    finally:
        engine.dispose()


def upgrade_schema(
    path: str | Path | None = None, *, url: str | None = None, embedder: str | None = None
) -> SchemaStatus:
    """Bring the memory's database to the newest revision; returns the revision it was at.
    A new database is created for `embedder` (default: MEMLAYER_EMBEDDER, else MiniLM); an
    existing one keeps the embedder it was created with."""
    settings = Settings()
    target = _target(path, url, settings)
    before = schema_status(url=target).revision
    engine = open_engine(target)
    try:
        with engine.connect() as conn:
            stored = migrations.stored_embedder(conn)
    finally:
        engine.dispose()
    if stored is None:
        chosen = resolve_embedder(embedder if embedder is not None else settings.embedder)
        stored = (chosen.name, chosen.dim)
    name, dim = stored
    options = DatabaseOptions(pool_size=1, migrate=True)
    RecordStore(target, embedder_name=name, dim=dim, keywords=index_text, options=options).close()
    return SchemaStatus(before, migrations.head())


def _target(path: str | Path | None, url: str | None, settings: Settings) -> str:
    """The database URL a `Memory(path, url=url)` would open."""
    if path is None and url is None:
        url = settings.url
    return database_url(memory_folder(path, url, settings), url)
