"""Semantic records in SQL: text, metadata, scope and embedding, the source of truth of `Memory`.

SQLAlchemy Core over SQLite (default; WAL, synchronous=FULL) or PostgreSQL. Each row keeps
the keyword string full-text search indexes (derived by a function the caller gives), so a
keyword index in `memlayer.retrievers` can follow the table.
A record's key is (tenant, id): the same id in two tenants names two records, and every
lookup by id is confined to one tenant.

On SQLite the embedding is a float32 blob, and every write transaction takes the next
sequence number and logs the rowids it touched under it, so the vector index each process
keeps can catch up with writes made by others (`changes_since`). On PostgreSQL the embedding
is a pgvector `vector` column searched in SQL, metadata is `jsonb`, and there is no log: no
process keeps index state, so many workers on many hosts can never disagree.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from memlayer.config import DatabaseOptions
from memlayer.errors import InvalidInputError, ModelMismatchError, StorageError
from memlayer.stores.database import schema_lock
from memlayer.types import SCOPE_FIELDS, Scope

DEFAULT_TENANT = ""  # stored for tenant_id=None: a user-given tenant is never empty
LOG_KEEP = 100_000  # write sequence numbers of change log kept behind a saved vector index

T = TypeVar("T")
_PG_ROWS = 500  # rows per INSERT statement on PostgreSQL


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
    """A record to insert, or to replace when its (tenant, id) exists."""

    id: str
    text: str
    metadata: dict[str, Any]
    scope: Scope
    embedding: np.ndarray


@dataclass
class Changes:
    """What changed after a sequence number: the rows now present and the rowids now gone."""

    seq: int
    rowids: np.ndarray
    vectors: np.ndarray
    gone: np.ndarray


_TOO_LARGE_FOR_INDEX = "54000"  # PostgreSQL's program_limit_exceeded: a btree entry too big


class RecordStore:
    """The records table: upsert, read, delete, scope/filter selection, BM25 and the change log."""

    def __init__(
        self,
        url: str,
        *,
        embedder_name: str,
        dim: int,
        keywords: Callable[[str], str],
        options: DatabaseOptions | None = None,
    ):
        """`keywords` derives the string full-text search indexes from a record's text."""
        from memlayer.stores.database import open_engine, writer

        self._keywords = keywords
        self.options = options or DatabaseOptions()
        self.engine = open_engine(
            url,
            statement_timeout_s=self.options.statement_timeout_s,
            pool_size=self.options.pool_size,
        )
        self._writer = writer(self.engine)
        self.dialect = self.engine.dialect.name
        self.dim = dim
        # PostgreSQL: metadata paths with a covering filter index (`PgVectorSearch`), whose
        # equality filters are written as the index's expression
        self.indexed_paths: frozenset[str] = frozenset()
        self.records, self.changes, self.settings, self.schema = _tables(self.dialect, dim)
        try:
            with self._writer.begin() as conn:
                self._create_or_migrate(conn)
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"cannot open the records database at {url}: {exc}") from exc
        self._check_embedder(embedder_name, dim)

    # -- schema ---------------------------------------------------------------------------

    def _create_or_migrate(self, conn: Any) -> None:
        from memlayer.stores import migrations

        if self.options.migrate:
            migrations.upgrade(conn, dim=self.dim, keywords=self._keywords)
        else:
            migrations.require_head(conn)

    def _check_embedder(self, name: str, dim: int) -> None:
        with self.schema_change() as conn:  # two first openers would both record theirs
            stored = self._setting("embedder", conn)
            if stored is None:
                self._set_setting("embedder", json.dumps({"name": name, "dim": dim}), conn)
                self._set_setting("seq", "0", conn)
                return
        created_with = json.loads(stored)
        if created_with["dim"] != dim:
            raise InvalidInputError(
                "embedder",
                f"must produce {created_with['dim']}-dim vectors like the "
                "embedder this memory was created with",
                f"{name} ({dim} dims)",
            )
        if created_with["name"] != name:
            raise ModelMismatchError(
                f"this memory was created with the embedder {created_with['name']!r}; "
                f"{name!r} places texts elsewhere in its {dim}-dim space, so its searches "
                "would rank the stored vectors at random"
            )

    def _setting(self, key: str, conn: Any = None) -> str | None:
        from sqlalchemy import select

        stmt = select(self.settings.c.value).where(self.settings.c.key == key)
        if conn is not None:
            return conn.execute(stmt).scalar_one_or_none()
        with self.engine.connect() as own:
            return own.execute(stmt).scalar_one_or_none()

    def _set_setting(self, key: str, value: str, conn: Any) -> None:
        table = self.settings
        updated = conn.execute(table.update().where(table.c.key == key).values(value=value))
        if updated.rowcount == 0:
            conn.execute(table.insert().values(key=key, value=value))

    # -- the write sequence and its log ---------------------------------------------------

    def seq(self) -> int:
        """The write sequence number: it grows with every committed write."""
        return int(self._setting("seq") or 0)

    @property
    def logs_changes(self) -> bool:
        """Whether writes are logged for per-process vector indexes (SQLite only)."""
        return self.dialect != "postgresql"

    def _log(self, conn: Any, rowids: Sequence[int]) -> int:
        """Take the next sequence number and record the rowids this transaction touched
        (on PostgreSQL nothing is logged: nothing mirrors the table)."""
        if not self.logs_changes:
            return 0
        seq = int(self._setting("seq", conn) or 0) + 1
        self._set_setting("seq", str(seq), conn)
        if rowids:
            conn.execute(self.changes.insert(), [{"seq": seq, "rowid": r} for r in rowids])
        return seq

    def changes_since(self, applied: int) -> Changes | None:
        """Rows written or deleted after sequence `applied`, read in one snapshot.

        None when the log no longer reaches back to `applied` (pruned): rebuild instead.
        """
        from sqlalchemy import select

        table = self.records
        with self.engine.connect() as conn:
            seq = int(self._setting("seq", conn) or 0)
            if seq == applied:
                nothing = np.zeros(0, dtype=np.int64)
                return Changes(seq, nothing, np.zeros((0, 0), dtype=np.float32), nothing)
            if applied < int(self._setting("log_floor", conn) or 0):
                return None
            touched = sorted(
                {
                    int(r)
                    for r in conn.execute(
                        select(self.changes.c.rowid).where(self.changes.c.seq > applied)
                    ).scalars()
                }
            )
            present = conn.execute(
                select(table.c.rowid, table.c.embedding).where(table.c.rowid.in_(touched))
            ).all()
        rowids = np.asarray([int(r) for r, _ in present], dtype=np.int64)
        vectors = _vectors([blob for _, blob in present])
        gone = np.setdiff1d(np.asarray(touched, dtype=np.int64), rowids)
        return Changes(seq, rowids, vectors, gone)

    def prune_log(self, saved: int) -> None:
        """Drop log entries far behind `saved`, the sequence a saved vector index reflects."""
        floor = saved - LOG_KEEP
        if floor <= int(self._setting("log_floor") or 0):
            return
        with self.write() as conn:
            conn.execute(self.changes.delete().where(self.changes.c.seq <= floor))
            self._set_setting("log_floor", str(floor), conn)

    # -- writes ---------------------------------------------------------------------------

    def upsert(self, rows: Sequence[NewRecord]) -> tuple[list[int], int]:
        """Insert or replace rows by (tenant, id) in one transaction: (rowids, sequence).

        A replaced row keeps its rowid and created_at (and so its place in `scan`)."""
        now = time.time()
        values = [self._row_values(row, now) for row in rows]

        def work() -> tuple[list[int], int]:
            with self.write() as conn:
                if self.dialect == "postgresql":
                    out = self._upsert_postgres(conn, values)
                else:
                    out = [self._upsert_one(conn, row) for row in values]
                return out, self._log(conn, out)

        return self._transaction(work)

    def _transaction(self, work: Callable[[], T]) -> T:
        """Run one write transaction; on PostgreSQL again after a lost connection or a
        rolled-back transaction. Every write is idempotent (ids are chosen before it runs),
        so a retry after a commit whose answer was lost stores nothing twice."""
        if self.dialect != "postgresql":
            return work()
        from memlayer.stores.database import retrying

        return retrying(work, deadline_s=self.options.retry_s)

    def _row_values(self, row: NewRecord, now: float) -> dict[str, Any]:
        return {
            "id": row.id,
            "text": row.text,
            "keywords": self._keywords(row.text),
            "metadata": row.metadata,
            "embedding": self._stored_vector(row.embedding),
            "created_at": now,
            "updated_at": now,
            **{name: getattr(row.scope, name) for name in SCOPE_FIELDS},
            "tenant_id": row.scope.tenant_id or DEFAULT_TENANT,
        }

    def _upsert_one(self, conn: Any, values: dict[str, Any]) -> int:
        from sqlalchemy import select

        table = self.records
        key = (table.c.tenant_id == values["tenant_id"]) & (table.c.id == values["id"])
        found = conn.execute(select(table.c.rowid).where(key)).first()
        if found is None:
            return int(conn.execute(table.insert().values(**values)).inserted_primary_key[0])
        kept = {k: v for k, v in values.items() if k not in ("id", "created_at")}
        conn.execute(table.update().where(table.c.rowid == found[0]).values(**kept))
        return int(found[0])

    def _upsert_postgres(self, conn: Any, values: list[dict[str, Any]]) -> list[int]:
        """INSERT ... ON CONFLICT in the caller's transaction (ids are distinct within it),
        sent by SQLAlchemy's insertmanyvalues as statements of `_PG_ROWS` rows: few round
        trips, one compiled statement for any batch, each statement short enough for a
        statement timeout and under the server's 65,535 parameters."""
        from sqlalchemy.dialects.postgresql import insert

        statement = insert(self.records)
        replaced = {
            name: statement.excluded[name]
            for name in values[0]
            if name not in ("id", "tenant_id", "created_at")
        }
        returning = statement.on_conflict_do_update(
            constraint="records_key", set_=replaced
        ).returning(self.records.c.rowid, self.records.c.id)
        rows = conn.execution_options(insertmanyvalues_page_size=_PG_ROWS).execute(
            returning, values
        )
        rowids = {rid: int(rowid) for rowid, rid in rows}
        return [rowids[row["id"]] for row in values]

    def update(
        self,
        condition: Any,
        *,
        text: str | None,
        metadata: dict[str, Any] | None,
        embedding: np.ndarray | None,
    ) -> tuple[int, int] | None:
        """Change the one record matching `condition`: (rowid, sequence), or None if none does."""
        from sqlalchemy import select

        values: dict[str, Any] = {"updated_at": time.time()}
        if text is not None and embedding is not None:
            values.update(
                text=text,
                keywords=self._keywords(text),
                embedding=self._stored_vector(embedding),
            )
        if metadata is not None:
            values["metadata"] = metadata
        table = self.records

        def work() -> tuple[int, int] | None:
            with self.write() as conn:
                found = conn.execute(select(table.c.rowid).where(condition)).first()
                if found is None:
                    return None
                conn.execute(table.update().where(table.c.rowid == found[0]).values(**values))
                return int(found[0]), self._log(conn, [int(found[0])])

        return self._transaction(work)

    def delete_where(self, condition: Any) -> tuple[list[int], int]:
        """Delete the rows matching a SQL condition: (their rowids, sequence).

        When a retry follows a commit whose answer was lost, the rows the earlier attempt
        found and that are gone now were deleted by that commit: they are reported deleted,
        not missing."""
        from sqlalchemy import select

        table = self.records
        earlier: set[int] = set()

        def work() -> tuple[list[int], int]:
            with self.write() as conn:
                found = conn.execute(select(table.c.rowid).where(condition)).scalars()
                rowids = [int(r) for r in found]
                gone = earlier - set(rowids)
                earlier.update(rowids)
                if not rowids:
                    return sorted(gone), int(self._setting("seq", conn) or 0)
                conn.execute(table.delete().where(table.c.rowid.in_(rowids)))
                return sorted(gone.union(rowids)), self._log(conn, rowids)

        return self._transaction(work)

    # -- reads ----------------------------------------------------------------------------

    def fetch(
        self,
        rowids: Sequence[int],
        scope: Scope,
        where: Any = None,
        *,
        embeddings: bool = False,
    ) -> dict[int, Record]:
        """The records with these rowids that (still) lie in `scope` and match `where` (a
        `filter_clause`, None for none), with their embeddings when asked."""
        if not rowids:
            return {}
        condition = self.condition(scope, where=where, indexed=False)
        rows = self.fetch_where(
            self.records.c.rowid.in_([int(r) for r in rowids]) & condition, embeddings=embeddings
        )
        return {row.rowid: row for row in rows}

    def fetch_where(
        self,
        condition: Any,
        *,
        embeddings: bool = False,
        oldest_first: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Record]:
        """Records matching a SQL condition, with their embeddings when asked; `oldest_first`
        orders them as they were first written (the rowid order: a replaced record keeps its
        place); `offset` skips that many first."""
        from sqlalchemy import select

        table = self.records
        query = select(*self.record_columns(embeddings)).where(condition)
        if oldest_first:
            query = query.order_by(table.c.rowid)
        if limit is not None:
            query = query.limit(limit)
        if offset:
            query = query.offset(offset)
        with self.engine.connect() as conn:
            return [record_of(row._mapping) for row in conn.execute(query)]

    def record_columns(self, embeddings: bool = False) -> list[Any]:
        """The columns a `Record` is read from (`record_of`), the embedding when asked."""
        skip = ("keywords",) if embeddings else ("embedding", "keywords")
        return [c for c in self.records.c if c.name not in skip]

    def filter_clause(self, filters: Mapping[str, Any] | None) -> Any:
        """`filters` as a SQL condition on the metadata, to build once and pass as `where`."""
        from memlayer.stores.filters import to_sql

        return to_sql(filters, self.records.c.metadata, self.dialect, self.indexed_paths)

    def condition(
        self,
        scope: Scope,
        filters: Mapping[str, Any] | None = None,
        *,
        id: str | None = None,
        ids: Sequence[str] | None = None,
        indexed: bool = True,
        where: Any = None,
    ) -> Any:
        """SQL condition: records of `scope`'s tenant whose other named scope fields match,
        that satisfy `filters` (or `where`, the same already built by `filter_clause`) and,
        when given, have this id (or one of these ids).

        `indexed=False` keeps the scope terms off the scope index, for queries that find
        their rows by rowid: SQLite would otherwise walk every row of the tenant.
        """
        from sqlalchemy import and_

        table = self.records

        def column(name: str) -> Any:
            return table.c[name] if indexed else table.c[name].op("||")("")

        parts = [column("tenant_id") == (scope.tenant_id or DEFAULT_TENANT)]
        parts += [column(k) == v for k, v in scope.as_dict().items() if k != "tenant_id"]
        if id is not None:
            parts.append(table.c.id == id)
        if ids is not None:
            parts.append(table.c.id.in_(list(ids)))
        parts.append(self.filter_clause(filters) if where is None else where)
        return and_(*parts)

    def only_tenant(self, tenant: str | None) -> bool:
        """True when no record belongs to another tenant (two index seeks)."""
        from sqlalchemy import select

        key = tenant or DEFAULT_TENANT
        column = self.records.c.tenant_id
        stmt = select(self.records.c.rowid).where((column < key) | (column > key)).limit(1)
        with self.engine.connect() as conn:
            return conn.execute(stmt).first() is None

    def everything(self) -> Any:
        """SQL condition true for every record of every tenant (for stats)."""
        from sqlalchemy import true

        return true()

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

    def snapshot(self, batch: int = 10_000) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray]]]:
        """The sequence number and every (rowids, vectors) batch, read in one snapshot.

        The iterator holds one read transaction open until it is exhausted.
        """
        from sqlalchemy import select

        conn = self.engine.connect()
        seq = int(self._setting("seq", conn) or 0)
        table = self.records

        def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            try:
                stmt = select(table.c.rowid, table.c.embedding).order_by(table.c.rowid)
                result = conn.execute(stmt)
                while rows := result.fetchmany(batch):
                    yield (
                        np.asarray([r[0] for r in rows], dtype=np.int64),
                        _vectors([r[1] for r in rows]),
                    )
            finally:
                conn.close()

        return seq, batches()

    def _stored_vector(self, vector: np.ndarray) -> Any:
        """A vector as its column stores it: float32 bytes, or an array for pgvector."""
        vector = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        return vector if self.dialect == "postgresql" else vector.tobytes()

    def write(self) -> Any:
        """A write transaction (SQLite: begun IMMEDIATE); driver failures become StorageError."""
        return _Transaction(self._writer)

    @contextmanager
    def schema_change(self) -> Iterator[Any]:
        """A write transaction holding the schema lock (`database.schema_lock`), for the DDL
        and first settings that processes opening one database at once would collide on."""
        with self.write() as conn:
            schema_lock(conn)
            yield conn

    def close(self) -> None:
        """Release connections."""
        self.engine.dispose()


def _tables(dialect: str, dim: int) -> tuple[Any, Any, Any, Any]:
    """The records table, the change log and the settings table, on one MetaData."""
    from sqlalchemy import (
        Column,
        Float,
        Index,
        Integer,
        MetaData,
        String,
        Table,
        Text,
        UniqueConstraint,
    )

    meta = MetaData()
    records = Table(
        "records",
        meta,
        Column("rowid", Integer, primary_key=True, autoincrement=True),
        Column("id", String(128), nullable=False),
        Column("tenant_id", String(256), nullable=False),
        *(Column(name, String(256), nullable=True) for name in SCOPE_FIELDS[1:]),
        Column("text", Text, nullable=False),
        Column("keywords", Text, nullable=False),
        Column("metadata", _json_type(dialect), nullable=False),
        Column("embedding", _vector_type(dialect, dim), nullable=False),
        Column("created_at", Float, nullable=False),
        Column("updated_at", Float, nullable=False),
        UniqueConstraint("tenant_id", "id", name="records_key"),
        Index("records_scope", *SCOPE_FIELDS),
        *_metadata_index(dialect),
        sqlite_autoincrement=True,  # a deleted rowid is never reused by a later record
    )
    changes = Table(
        "record_changes",
        meta,
        Column("seq", Integer, nullable=False),
        Column("rowid", Integer, nullable=False),
        Index("record_changes_seq", "seq"),
    )
    settings = Table(
        "memlayer_settings",
        meta,
        Column("key", String(64), primary_key=True),
        Column("value", Text, nullable=False),
    )
    return records, changes, settings, meta


def record_of(row: Mapping[str, Any]) -> Record:
    """A `Record` from a row of `RecordStore.record_columns` (the embedding when read)."""
    scope = {name: row[name] for name in SCOPE_FIELDS}
    scope["tenant_id"] = scope["tenant_id"] or None
    return Record(
        rowid=int(row["rowid"]),
        id=row["id"],
        text=row["text"],
        metadata=dict(row["metadata"] or {}),
        scope=Scope(**scope),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        embedding=_embedding(row["embedding"]) if "embedding" in row else None,
    )


def _embedding(stored: Any) -> np.ndarray:
    """A stored embedding as float32: SQLite keeps bytes, pgvector hands back an array."""
    if isinstance(stored, (bytes, bytearray, memoryview)):
        return np.frombuffer(stored, dtype=np.float32)
    return np.asarray(stored, dtype=np.float32)


def _metadata_index(dialect: str) -> list[Any]:
    """PostgreSQL: GIN over the metadata, which answers the filters' containment tests."""
    from sqlalchemy import Index

    if dialect != "postgresql":
        return []
    return [
        Index(
            "records_metadata",
            "metadata",
            postgresql_using="gin",
            postgresql_ops={"metadata": "jsonb_path_ops"},
        )
    ]


def _json_type(dialect: str) -> Any:
    """JSON on SQLite, jsonb on PostgreSQL (what the filters' typed paths need)."""
    from sqlalchemy import JSON

    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import JSONB

        return JSONB()
    return JSON()


def _vector_type(dialect: str, dim: int) -> Any:
    """A float32 blob, or pgvector's `vector(dim)` on PostgreSQL."""
    from sqlalchemy import LargeBinary

    if dialect == "postgresql":
        from memlayer.optional import require

        return require("pgvector.sqlalchemy", "postgres").Vector(dim)
    return LargeBinary()


def _vectors(blobs: Sequence[bytes]) -> np.ndarray:
    if not blobs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1)


class _Transaction:
    """A write transaction that turns driver failures (disk full, locked) into StorageError."""

    def __init__(self, engine: Any):
        self._context = engine.begin()

    def __enter__(self) -> Any:
        from sqlalchemy.exc import OperationalError

        try:
            return self._context.__enter__()
        except OperationalError as error:
            raise StorageError(
                f"the records database refused the write: {_reason(error)}"
            ) from error

    def __exit__(self, *exc: Any) -> bool:
        from sqlalchemy.exc import OperationalError

        try:
            suppressed = bool(self._context.__exit__(*exc))
        except OperationalError as error:
            raise StorageError(
                f"the records database refused the write: {_reason(error)}"
            ) from error
        if isinstance(exc[1], OperationalError):  # rolled back above
            if getattr(exc[1].orig, "sqlstate", None) == _TOO_LARGE_FOR_INDEX:
                raise InvalidInputError(
                    "metadata",
                    "a record's metadata, scope ids and vector must fit an entry of a covering "
                    "filter index (pg_filter_keys; 2,704 bytes): shorten them or index fewer "
                    "keys",
                ) from exc[1]
            raise StorageError(
                f"the records database refused the write: {_reason(exc[1])}"
            ) from exc[1]
        return suppressed


def _reason(error: Any) -> str:
    """The driver's own message, without the statement and its parameters (which can be
    megabytes of vectors)."""
    return str(getattr(error, "orig", None) or error).strip().splitlines()[0]
