"""Vector search in PostgreSQL with pgvector: an HNSW index (cosine) over the records'
`vector` column, searched in SQL, so every worker on every host sees the same index.

A filtered HNSW search can return fewer than k rows: before 0.8 pgvector filters the
ef_search candidates it found; from 0.8 an iterative scan walks on until k match, but
stops after `hnsw.max_scan_tuples`. So a search returns the true top-k of the matching
records: it ranks exactly when the planner expects few matches, and when the index still
comes back short.

An exact ranking reads every matching record's vector. Found through the metadata's GIN
index, those are rows scattered over the table (a 1% filter at 1M records: 10,000 rows on
10,000 pages); for the keys named in `pg_filter_keys` a covering btree index (tenant, the
key's value; the scope, the metadata and the vector included) holds them side by side, and
the ranking reads the index alone (an index-only scan).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from memlayer.errors import InvalidInputError
from memlayer.retrievers.vector_index import IndexConfig
from memlayer.retrievers.vector_search import Fetch, Hits, Ranking
from memlayer.stores.filters import path_expression
from memlayer.stores.records import DEFAULT_TENANT, RecordStore, record_of
from memlayer.types import SCOPE_FIELDS, Scope

Found = list[tuple[int, float, Any]]  # (rowid, cosine, the row read with it or None)
_INDEX = "records_embedding_hnsw"
_MAX_EF_SEARCH = 1000  # the largest hnsw.ef_search pgvector accepts
# a btree entry holds at most 2,704 bytes: a covering index's vector must leave room for
# the tenant, the key's value, the scope and the metadata
_MAX_COVERED_DIM = 512
_FILTER_LOCK = 0x6D6C6669  # session advisory lock held while filter indexes are built ('mlfi')


def _filter_index_sql(name: str, key: str, *, concurrently: bool) -> str:
    """CREATE INDEX of a covering filter index: the tenant and the key's value, with the
    rowid, the scope, the metadata and the vector included (all a filtered ranking reads)."""
    covered = ", ".join(["rowid", *SCOPE_FIELDS[1:], "metadata", "embedding"])
    how = "CONCURRENTLY " if concurrently else ""
    return (
        f"CREATE INDEX {how}IF NOT EXISTS {name} ON records "
        f"(tenant_id, ({path_expression(key)})) INCLUDE ({covered})"
    )


def check_filter_keys(config: IndexConfig, dim: int) -> None:
    """InvalidInputError when `pg_filter_keys` are set for vectors too wide for an entry of
    a covering filter index (checked before a database is created)."""
    if config.pg_filter_keys and dim > _MAX_COVERED_DIM:
        raise InvalidInputError(
            "pg_filter_keys",
            f"a covering filter index holds the vectors: at most {_MAX_COVERED_DIM} "
            f"dimensions (these have {dim})",
        )


class PgVectorSearch:
    """Top-k by cosine over the records table, through HNSW or an exact scan.

    One search is one transaction on one connection: the planner's estimate of the matches
    where it can change the way (`EXPLAIN`, no rows read), the way's settings, then one
    statement that ranks and, for `search_records`, reads the hits' records with it (the
    ranked ids joined back to the table by primary key); again exactly when HNSW comes back
    with fewer than k."""

    def __init__(self, records: RecordStore, config: IndexConfig) -> None:
        self._records = records
        self._config = config
        check_filter_keys(config, records.dim)
        records.indexed_paths = frozenset(config.pg_filter_keys)
        with records.schema_change() as conn:
            self._build_index(conn, filters=False)
            version = conn.exec_driver_sql(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
            ).scalar()
        self.iterative = _version(version) >= (0, 8)
        self._ensure_filter_indexes()

    def search(
        self, vector: np.ndarray, k: int, condition: Any, scope: Scope, whole_tenant: bool
    ) -> Ranking:
        """The k records matching `condition` nearest to `vector` (cosine), best first."""
        found = self._search(vector, k, condition, scope, whole_tenant, None)
        return [(rowid, score) for rowid, score, _ in found]

    def search_records(
        self,
        vector: np.ndarray,
        k: int,
        condition: Any,
        scope: Scope,
        whole_tenant: bool,
        *,
        embeddings: bool,
        fetch: Fetch,
    ) -> Hits:
        """`search` with each hit's record, read by the ranking statement itself (`fetch`
        is not needed: the records come from the same snapshot, under the same condition)."""
        columns = self._records.record_columns(embeddings)
        found = self._search(vector, k, condition, scope, whole_tenant, columns)
        return [(record_of(row), score) for _, score, row in found]

    def _search(
        self,
        vector: np.ndarray,
        k: int,
        condition: Any,
        scope: Scope,
        whole_tenant: bool,
        columns: list[Any] | None,
    ) -> Found:
        """The true top-k of the matches when the planner expects at most `pg_exact_below`
        of them (an exact scan); otherwise HNSW's, exactly again if it finds fewer than k.
        A search of a whole tenant that is alone in a table the planner knows to hold more
        than `pg_exact_below` records goes through HNSW without asking for the estimate
        (it would be the table's size): the check rides on the index settings' statement."""
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        # pgvector takes at most 1,000: a larger k walks on iteratively, or comes back short
        ef_search = min(max(self._config.hnsw_ef_search, k), _MAX_EF_SEARCH)
        with self._records.engine.begin() as conn:
            tenant = scope.tenant_id or DEFAULT_TENANT
            if not (whole_tenant and self._index_settings(conn, ef_search, tenant)):
                if self._few(conn, condition):
                    if whole_tenant:  # the index settings were made: seqscans back on
                        self._seqscan_back(conn)
                    return self._ranked(conn, query, k, condition, None, columns)
                if not whole_tenant:  # (a whole tenant's search has them already)
                    self._index_settings(conn, ef_search, None)
            found = self._ranked(conn, query, k, condition, ef_search, columns)
            if len(found) < k:
                return self._ranked(conn, query, k, condition, None, columns)
            return found

    @contextmanager
    def bulk_load(self) -> Iterator[None]:
        """Drop the HNSW index (and the filter indexes) for the load and build them once
        after, from all the rows (a build is several times faster than maintaining the
        graph row by row), then refresh the table's statistics, without which the planner
        would take the grown table for an empty one. Meanwhile every worker's searches rank
        exactly (correct, slower); writers wait for the build."""
        with self._records.write() as conn:
            for name in (_INDEX, *self._filter_indexes()):
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
        try:
            yield
        finally:
            with self._records.schema_change() as conn:
                self._build_index(conn, filters=True)
            with self._records.write() as conn:  # the planner's row estimates, for filters too
                conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
                conn.exec_driver_sql("ANALYZE records")

    def _build_index(self, conn: Any, *, filters: bool) -> None:
        """Create the HNSW index (and with `filters` the filter indexes) unless it exists,
        in the caller's transaction, with the build memory configured and no statement
        timeout (a build over many rows takes minutes; a timeout meant for queries would
        cancel it every time)."""
        conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
        memory_mb = self._config.pg_build_memory_mb
        if memory_mb is not None:
            conn.exec_driver_sql(f"SET LOCAL maintenance_work_mem = '{int(memory_mb)}MB'")
        conn.exec_driver_sql(
            f"CREATE INDEX IF NOT EXISTS {_INDEX} ON records USING hnsw "
            f"(embedding vector_cosine_ops) WITH (m = {int(self._config.hnsw_m)}, "
            f"ef_construction = {int(self._config.hnsw_ef_construction)})"
        )
        if filters:
            for name, key in self._filter_indexes().items():
                conn.exec_driver_sql(_filter_index_sql(name, key, concurrently=False))

    def _ensure_filter_indexes(self) -> None:
        """Build the filter indexes that are missing, or were left invalid by a build that
        failed, without blocking writers (`CREATE INDEX CONCURRENTLY`, outside a
        transaction). A session lock makes workers opening together build each once: the
        others wait for it, and only then is an invalid index a leftover to drop."""
        names = self._filter_indexes()
        if not names:
            return
        valid_sql = (
            "SELECT c.relname, i.indisvalid FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = ANY(%(names)s)"
        )
        with self._records.engine.connect() as conn:
            auto = conn.execution_options(isolation_level="AUTOCOMMIT")
            valid = dict(auto.exec_driver_sql(valid_sql, {"names": list(names)}).all())
            if len(valid) == len(names) and all(valid.values()):
                return
            auto.exec_driver_sql("SELECT pg_advisory_lock(%(key)s)", {"key": _FILTER_LOCK})
            try:
                auto.exec_driver_sql("SET statement_timeout = 0")
                valid = dict(auto.exec_driver_sql(valid_sql, {"names": list(names)}).all())
                for name, key in names.items():
                    if valid.get(name) is False:
                        auto.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
                    if not valid.get(name):
                        auto.exec_driver_sql(_filter_index_sql(name, key, concurrently=True))
            finally:
                auto.exec_driver_sql("RESET statement_timeout")
                auto.exec_driver_sql("SELECT pg_advisory_unlock(%(key)s)", {"key": _FILTER_LOCK})

    def _filter_indexes(self) -> dict[str, str]:
        """The covering filter indexes by name, each with its metadata key path."""
        names = {}
        for key in self._config.pg_filter_keys:
            slug = re.sub(r"[^a-z0-9_]", "_", key.lower())[:30]
            digest = hashlib.sha256(key.encode()).hexdigest()[:8]
            names[f"records_filter_{slug}_{digest}"] = key
        return names

    def _ranked(
        self,
        conn: Any,
        query: np.ndarray,
        k: int,
        condition: Any,
        ef_search: int | None,
        columns: list[Any] | None = None,
    ) -> Found:
        """Top-k through the HNSW index (`ef_search` given) or by an exact scan (None), under
        the settings the caller made for that way, in one statement: (rowid, cosine, row),
        the row of `columns` when given (the ranked ids joined back to the table), else
        None. The exact scan orders by the distance plus 0, an expression HNSW cannot
        serve: the planner finds the matching rows by any other index (a covering filter
        index, read alone; the metadata's GIN index; the scope's) and sorts them."""
        from sqlalchemy import literal_column, select

        table = self._records.records
        distance = table.c.embedding.cosine_distance(query)
        if ef_search is None:
            distance = distance + literal_column("0")
        distance = distance.label("distance")
        ranking = select(table.c.rowid, distance).where(condition).order_by(distance).limit(k)
        if columns is None:
            rows = conn.execute(ranking)
            found = [(int(row.rowid), 1.0 - float(row.distance), None) for row in rows]
        else:
            ranked = ranking.subquery("ranked")
            stmt = (
                select(ranked.c.distance, *columns)
                .join_from(ranked, table, table.c.rowid == ranked.c.rowid)
                .order_by(ranked.c.distance)
            )
            found = [
                (int(row.rowid), 1.0 - float(row.distance), row._mapping)
                for row in conn.execute(stmt)
            ]
        return sorted(found, key=lambda hit: -hit[1])  # a relaxed iterative scan's order

    def _seqscan_back(self, conn: Any) -> None:
        """Sequential scans back to the server's setting, after `_index_settings` turned
        them off in this transaction and the exact way was chosen."""
        conn.exec_driver_sql(
            "SELECT set_config('enable_seqscan', "
            "(SELECT reset_val FROM pg_settings WHERE name = 'enable_seqscan'), true)"
        )

    def _index_settings(self, conn: Any, ef_search: int, tenant: str | None) -> bool:
        """This transaction's index scan settings, in one round trip: the HNSW index over a
        sort of the table, `ef_search` candidates, and an iterative scan where the server's
        pgvector has one: relaxed order (better recall under a filter: 0.58 against 0.47
        for strict order at 1M records under a 1% filter), re-sorted by `_ranked`.

        With `tenant`, the same statement answers whether the planner's estimate for that
        whole tenant would exceed `pg_exact_below` (so HNSW is the way): the tenant is the
        only one in the table (the lowest and highest tenant ids, two seeks in the scope
        index) and the table's analysed row count exceeds it (-1 when never analysed)."""
        settings = {"enable_seqscan": "off", "hnsw.ef_search": str(int(ef_search))}
        if self.iterative:
            settings["hnsw.iterative_scan"] = "relaxed_order"
        calls = ", ".join(f"set_config('{name}', %s, true)" for name in settings)
        if tenant is None:
            conn.exec_driver_sql(f"SELECT {calls}", tuple(settings.values()))
            return False
        check = (
            "(SELECT min(tenant_id) FROM records) = %s AND (SELECT max(tenant_id) FROM records)"
            " = %s AND (SELECT reltuples FROM pg_class WHERE oid = 'records'::regclass) > %s"
        )
        values = (*settings.values(), tenant, tenant, int(self._config.pg_exact_below))
        row = conn.exec_driver_sql(f"SELECT {calls}, {check}", values).one()
        return bool(row[-1])

    def _few(self, conn: Any, condition: Any) -> bool:
        """Whether the planner expects at most `pg_exact_below` records to match `condition`
        (no rows read): then ranking them exactly is cheap, and sure to be complete."""
        return self._expected(conn, condition) <= self._config.pg_exact_below

    def _expected(self, conn: Any, condition: Any) -> float:
        """The planner's estimate of how many records match `condition` (no rows read)."""
        from sqlalchemy import select

        stmt = select(self._records.records.c.rowid).where(condition)
        compiled = stmt.compile(conn, compile_kwargs={"render_postcompile": True})
        plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params)
        return float(_plan(plan.scalar())[0]["Plan"]["Plan Rows"])

    def wrote(self, seq: int, rowids: np.ndarray, vectors: np.ndarray | None) -> None:
        """Nothing to do: the write is already in the table the search reads."""

    def count(self) -> int:
        """Records with a vector (every record)."""
        from sqlalchemy import true

        return self._records.count_where(true())

    def save(self) -> None:
        """Nothing to save: the index lives in the database."""


def _plan(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _version(text: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in (text or "0").split(".")[:2] if part.isdigit())
