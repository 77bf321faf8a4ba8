"""Saved sessions in a database, so a session saved by one host is loaded by another.

A saved session is one row of `memlayer_kv_sessions` (its name, metadata as JSON, its state as
bytes) and its pages in a SQL tier (`memlayer_kv_pages`), keyed `<name>/<generation>/<page>`.
Each save writes a new generation of pages, then commits the row that names it, then deletes
the older generations: a reader sees the previous save or the new one whole, never a mix, and
a save that dies half-way leaves only unreferenced pages that the next save of the name removes.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from memlayer.errors import InvalidInputError, NotFoundError, StorageError
from memlayer.stores.database import create_tables, open_engine, retrying
from memlayer.stores.sql_tier import SQLTier
from memlayer.types import Page

_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")


@dataclass(frozen=True)
class SavedSession:
    """What one save stored: the caller's metadata and state, and its pages."""

    name: str
    meta: dict[str, Any]
    state: bytes
    pages: GenerationPages


class GenerationPages:
    """One generation's pages, under their own ids, in the shared page table."""

    def __init__(self, tier: SQLTier, prefix: str):
        self._tier = tier
        self._prefix = prefix

    def put_many(self, pages: Sequence[Page]) -> list[Page]:
        return self._tier.put_many([replace(page, id=self._prefix + page.id) for page in pages])

    def get_many(self, page_ids: Sequence[str]) -> list[Page]:
        stored = self._tier.get_many([self._prefix + page_id for page_id in page_ids])
        return [replace(page, id=page_id) for page, page_id in zip(stored, page_ids, strict=True)]


class SavedSessions:
    """The saved sessions of the database at `url` (SQLite or PostgreSQL)."""

    def __init__(self, url: str, *, retry_s: float = 30.0):
        from sqlalchemy import Column, Float, LargeBinary, MetaData, String, Table, Text
        from sqlalchemy.exc import SQLAlchemyError

        self.url = url
        self._retry_s = retry_s
        self._engine = open_engine(url)
        self._table = Table(
            "memlayer_kv_sessions",
            MetaData(),
            Column("name", String(128), primary_key=True),
            Column("generation", String(32), nullable=False),
            Column("meta", Text, nullable=False),
            Column("state", LargeBinary, nullable=False),
            Column("saved_at", Float, nullable=False),
        )
        try:
            create_tables(self._engine, self._table.metadata)
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot open the saved sessions in {url}: {exc}") from exc
        self._pages = SQLTier(url, table="memlayer_kv_pages", name="saved-sessions")

    def new_generation(self, name: str) -> tuple[str, GenerationPages]:
        """A fresh generation for a save of `name`: its id and where its pages go."""
        generation = uuid.uuid4().hex
        return generation, GenerationPages(self._pages, f"{check_name(name)}/{generation}/")

    def commit(self, name: str, generation: str, *, meta: dict[str, Any], state: bytes) -> None:
        """Make `generation` the saved session `name`, then drop its older generations."""
        from sqlalchemy import delete, insert

        table = self._table
        row = {
            "name": check_name(name),
            "generation": generation,
            "meta": json.dumps(meta),
            "state": state,
            "saved_at": time.time(),
        }

        def write() -> None:
            with self._engine.begin() as conn:
                conn.execute(delete(table).where(table.c.name == name))
                conn.execute(insert(table), [row])

        retrying(write, deadline_s=self._retry_s)
        self._pages.evict_prefix(f"{name}/", keep=f"{name}/{generation}/")

    def open(self, name: str) -> SavedSession:
        """The saved session `name` (NotFoundError when none was saved)."""
        from sqlalchemy import select

        table = self._table
        with self._engine.connect() as conn:
            row = conn.execute(
                select(table.c.generation, table.c.meta, table.c.state).where(
                    table.c.name == check_name(name)
                )
            ).first()
        if row is None:
            raise NotFoundError("saved KV session", f"{name} in {self.url}")
        pages = GenerationPages(self._pages, f"{name}/{row.generation}/")
        return SavedSession(name, json.loads(row.meta), bytes(row.state), pages)

    def close(self) -> None:
        self._pages.close()
        self._engine.dispose()

    def __enter__(self) -> SavedSessions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_name(name: object) -> str:
    """A session name: 1-128 letters, digits, '.', '_' or '-' (it prefixes page ids)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInputError("name", "must be 1-128 letters, digits, '.', '_' or '-'", name)
    return name
