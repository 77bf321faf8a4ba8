"""Semantic records in SQL: text, metadata, scope and embedding, the source of truth of `Memory`.

SQLAlchemy Core over SQLite (default; WAL, synchronous=FULL, FTS5 for BM25) or PostgreSQL.
Every write bumps a sequence number so a vector index can tell whether it is stale.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memlayer.errors import InvalidInputError, StorageError
from memlayer.types import SCOPE_FIELDS, Scope

_FTS_DDL = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS records_fts USING fts5("
    "text, content='records', content_rowid='rowid')",
    "CREATE TRIGGER IF NOT EXISTS records_ai AFTER INSERT ON records BEGIN "
    "INSERT INTO records_fts(rowid, text) VALUES (new.rowid, new.text); END",
    "CREATE TRIGGER IF NOT EXISTS records_ad AFTER DELETE ON records BEGIN "
    "INSERT INTO records_fts(records_fts, rowid, text) VALUES('delete', old.rowid, old.text); END",
    "CREATE TRIGGER IF NOT EXISTS records_au AFTER UPDATE OF text ON records BEGIN "
    "INSERT INTO records_fts(records_fts, rowid, text) VALUES('delete', old.rowid, old.text); "
    "INSERT INTO records_fts(rowid, text) VALUES (new.rowid, new.text); END",
)


@dataclass
class Record:
    """One stored record as read back from SQL."""

    rowid: int
    id: str
    text: str
    metadata: dict[str, Any]
    scope: Scope
    created_at: float
    updated_at: float
    embedding: np.ndarray | None = field(default=None, repr=False)


@dataclass
class NewRecord:
    """A record to insert or replace (by `id`)."""

    id: str
    text: str
    metadata: dict[str, Any]
    scope: Scope
    embedding: np.ndarray


class RecordStore:
    """The records table: upsert, read, delete, scope/filter selection and BM25 keyword search."""

    def __init__(self, url: str, *, embedder_name: str, dim: int):
        from sqlalchemy import (
            JSON,
            Column,
            Float,
            Index,
            Integer,
            LargeBinary,
            MetaData,
            String,
            Table,
            Text,
        )

        from memlayer.stores.database import open_engine

        self.engine = open_engine(url)
        self.dialect = self.engine.dialect.name
        meta = MetaData()
        self.records = Table(
            "records",
            meta,
            Column("rowid", Integer, primary_key=True, autoincrement=True),
            Column("id", String(128), nullable=False, unique=True),
            *(Column(name, String(256), nullable=True) for name in SCOPE_FIELDS),
            Column("text", Text, nullable=False),
            Column("metadata", JSON, nullable=False),
            Column("embedding", LargeBinary, nullable=False),
            Column("created_at", Float, nullable=False),
            Column("updated_at", Float, nullable=False),
            Index("records_scope", *SCOPE_FIELDS),
        )
        self.settings = Table(
            "memlayer_settings",
            meta,
            Column("key", String(64), primary_key=True),
            Column("value", Text, nullable=False),
        )
        try:
            with self.engine.begin() as conn:
                meta.create_all(conn)
                if self.dialect == "sqlite":
                    for ddl in _FTS_DDL:
                        conn.exec_driver_sql(ddl)
        except Exception as exc:
            raise StorageError(f"cannot open the records database at {url}: {exc}") from exc
        self._check_embedder(embedder_name, dim)

    def _check_embedder(self, name: str, dim: int) -> None:
        stored = self._setting("embedder")
        wanted = json.dumps({"name": name, "dim": dim})
        if stored is None:
            self._set_setting("embedder", wanted)
            self._set_setting("seq", "0")
        elif json.loads(stored)["dim"] != dim:
            raise InvalidInputError(
                "embedder",
                f"must produce {json.loads(stored)['dim']}-dim vectors like the "
                "embedder this memory was created with",
                f"{name} ({dim} dims)",
            )

    def _setting(self, key: str, conn: Any = None) -> str | None:
        from sqlalchemy import select

        stmt = select(self.settings.c.value).where(self.settings.c.key == key)
        if conn is not None:
            return conn.execute(stmt).scalar_one_or_none()
        with self.engine.connect() as own:
            return own.execute(stmt).scalar_one_or_none()

    def _set_setting(self, key: str, value: str, conn: Any = None) -> None:
        if conn is None:
            with self.engine.begin() as own:
                self._set_setting(key, value, own)
            return
        table = self.settings
        updated = conn.execute(table.update().where(table.c.key == key).values(value=value))
        if updated.rowcount == 0:
            conn.execute(table.insert().values(key=key, value=value))

    def seq(self) -> int:
        """The write sequence number: it changes with every committed write."""
        return int(self._setting("seq") or 0)

    def _bump(self, conn: Any) -> None:
        self._set_setting("seq", str(int(self._setting("seq", conn) or 0) + 1), conn)

    def upsert(self, rows: Sequence[NewRecord]) -> list[tuple[int, bool]]:
        """Insert or replace rows by id in one transaction; returns (rowid, was_new) per row."""
        from sqlalchemy import select

        now = time.time()
        out: list[tuple[int, bool]] = []
        table = self.records
        with self._begin() as conn:
            for row in rows:
                values = {
                    "text": row.text,
                    "metadata": row.metadata,
                    "embedding": np.ascontiguousarray(row.embedding, dtype=np.float32).tobytes(),
                    "updated_at": now,
                    **{name: getattr(row.scope, name) for name in SCOPE_FIELDS},
                }
                found = conn.execute(select(table.c.rowid).where(table.c.id == row.id)).first()
                if found is None:
                    result = conn.execute(
                        table.insert().values(id=row.id, created_at=now, **values)
                    )
                    out.append((int(result.inserted_primary_key[0]), True))
                else:
                    conn.execute(table.update().where(table.c.rowid == found[0]).values(**values))
                    out.append((int(found[0]), False))
            self._bump(conn)
        return out

    def update(
        self,
        rowid: int,
        *,
        text: str | None,
        metadata: dict[str, Any] | None,
        embedding: np.ndarray | None,
    ) -> None:
        """Change a record's text (with its new embedding) and/or metadata."""
        values: dict[str, Any] = {"updated_at": time.time()}
        if text is not None and embedding is not None:
            values["text"] = text
            values["embedding"] = np.ascontiguousarray(embedding, dtype=np.float32).tobytes()
        if metadata is not None:
            values["metadata"] = metadata
        with self._begin() as conn:
            conn.execute(
                self.records.update().where(self.records.c.rowid == rowid).values(**values)
            )
            self._bump(conn)

    def delete_where(self, condition: Any) -> list[int]:
        """Delete the rows matching a SQL condition; returns their rowids."""
        from sqlalchemy import select

        table = self.records
        with self._begin() as conn:
            rowids = [
                int(r) for r in conn.execute(select(table.c.rowid).where(condition)).scalars()
            ]
            if rowids:
                conn.execute(table.delete().where(table.c.rowid.in_(rowids)))
                self._bump(conn)
        return rowids

    def by_id(self, record_id: str) -> Record | None:
        """The record with this id, or None."""
        rows = self.fetch_where(self.records.c.id == record_id, with_embedding=True)
        return rows[0] if rows else None

    def fetch(self, rowids: Sequence[int]) -> dict[int, Record]:
        """Records by rowid."""
        if not rowids:
            return {}
        rows = self.fetch_where(self.records.c.rowid.in_([int(r) for r in rowids]))
        return {row.rowid: row for row in rows}

    def fetch_where(self, condition: Any, *, with_embedding: bool = False) -> list[Record]:
        """Records matching a SQL condition."""
        from sqlalchemy import select

        table = self.records
        columns = [c for c in table.c if with_embedding or c.name != "embedding"]
        with self.engine.connect() as conn:
            result = conn.execute(select(*columns).where(condition))
            return [self._record(row._mapping) for row in result]

    def _record(self, row: Mapping[str, Any]) -> Record:
        blob = row.get("embedding")
        return Record(
            rowid=int(row["rowid"]),
            id=row["id"],
            text=row["text"],
            metadata=dict(row["metadata"] or {}),
            scope=Scope(**{name: row[name] for name in SCOPE_FIELDS}),
            created_at=float(row["created_at"]),
            updated_at=float(row["updated_at"]),
            embedding=None if blob is None else np.frombuffer(blob, dtype=np.float32).copy(),
        )

    def condition(self, scope: Scope, filters: Mapping[str, Any] | None) -> Any:
        """SQL condition selecting the records in `scope` that satisfy `filters`."""
        from sqlalchemy import and_

        from memlayer.stores.filters import to_sql

        parts = [self.records.c[name] == value for name, value in scope.as_dict().items()]
        parts.append(to_sql(filters, self.records.c.metadata, self.dialect))
        return and_(*parts)

    def rowids_where(self, condition: Any) -> np.ndarray:
        """Rowids of the records matching a condition, as int64."""
        from sqlalchemy import select

        with self.engine.connect() as conn:
            rows = conn.execute(select(self.records.c.rowid).where(condition)).scalars().all()
        return np.asarray(rows, dtype=np.int64)

    def count_where(self, condition: Any) -> int:
        """How many records match a condition."""
        from sqlalchemy import func, select

        with self.engine.connect() as conn:
            stmt = select(func.count()).select_from(self.records).where(condition)
            return int(conn.execute(stmt).scalar_one())

    def keyword_search(
        self, words: Sequence[str], k: int, condition: Any
    ) -> list[tuple[int, float]]:
        """Top-k BM25 matches of any of `words` among records matching `condition`."""
        if not words:
            return []
        if self.dialect != "sqlite":
            raise InvalidInputError(
                "mode", "keyword and hybrid search need SQLite (FTS5) in this release", self.dialect
            )
        from sqlalchemy import column, literal_column, select, table

        fts = table("records_fts", column("rowid"))
        match = " OR ".join('"' + word.replace('"', "") + '"' for word in words)
        score: Any = literal_column("bm25(records_fts)")
        stmt = (
            select(self.records.c.rowid, score)
            .select_from(fts.join(self.records, self.records.c.rowid == fts.c.rowid))
            .where(literal_column("records_fts").op("MATCH")(match), condition)
            .order_by(score)
            .limit(k)
        )
        with self.engine.connect() as conn:
            return [(int(rowid), -float(bm25)) for rowid, bm25 in conn.execute(stmt)]

    def iter_embeddings(self, batch: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (rowids, vectors) in batches, to rebuild a vector index from the source of truth."""
        from sqlalchemy import select

        table = self.records
        last = 0
        while True:
            stmt = (
                select(table.c.rowid, table.c.embedding)
                .where(table.c.rowid > last)
                .order_by(table.c.rowid)
                .limit(batch)
            )
            with self.engine.connect() as conn:
                rows = conn.execute(stmt).all()
            if not rows:
                return
            rowids = np.asarray([r[0] for r in rows], dtype=np.int64)
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
            yield rowids, vectors.reshape(len(rows), -1)
            last = int(rowids[-1])

    def _begin(self) -> Any:
        return _Transaction(self.engine)

    def close(self) -> None:
        """Release connections."""
        self.engine.dispose()


class _Transaction:
    """engine.begin() that turns driver failures (disk full, locked) into StorageError."""

    def __init__(self, engine: Any):
        self._context = engine.begin()

    def __enter__(self) -> Any:
        return self._context.__enter__()

    def __exit__(self, *exc: Any) -> bool:
        from sqlalchemy.exc import OperationalError

        try:
            return bool(self._context.__exit__(*exc))
        except OperationalError as error:
            raise StorageError(f"the records database refused the write: {error}") from error
