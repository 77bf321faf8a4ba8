"""Vector top-k over the records, one implementation per database.

SQLite: each process keeps a FAISS index mirroring the records table (`IndexMirror`),
caught up from the table's change log before every search. PostgreSQL: the vectors live in
the table and pgvector searches them in SQL (`PgVectorSearch`), so no process keeps state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from memlayer.retrievers.mirror import IndexMirror
from memlayer.retrievers.vector_index import IndexConfig
from memlayer.stores.records import Record, RecordStore
from memlayer.types import Scope

Ranking = list[tuple[int, float]]
Hits = list[tuple[Record, float]]
Fetch = Callable[[Ranking], Hits]  # the records of a ranking, read under the search's scope


class VectorSearch(Protocol):
    """Top-k records by cosine to a unit query vector, under a SQL condition."""

    def search(
        self, vector: np.ndarray, k: int, condition: Any, scope: Scope, whole_tenant: bool
    ) -> Ranking:
        """Best-first (rowid, cosine) of the records matching `condition`, at most k.
        `whole_tenant`: the condition is only `scope`'s tenant (no other field, no filter)."""
        ...

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
        """`search` with each hit's record (its embedding when asked): read in the ranking's
        own statement where the database ranks, else by `fetch` after the ranking."""
        ...

    def wrote(self, seq: int, rowids: np.ndarray, vectors: np.ndarray | None) -> None:
        """This process's own committed write (vectors None: a delete)."""
        ...

    def count(self) -> int:
        """How many vectors are searchable."""
        ...

    def save(self) -> None:
        """Persist what would otherwise be rebuilt on the next open."""
        ...

    def bulk_load(self) -> AbstractContextManager[None]:
        """Around a large load: what lets the index be built once after it, if anything."""
        ...


class MirroredVectorSearch:
    """A FAISS index per process, mirroring the records table through its change log."""

    def __init__(
        self, records: RecordStore, dim: int, path: Path | None, config: IndexConfig
    ) -> None:
        self._records = records
        self._lock = threading.RLock()
        self._mirror = IndexMirror(records, dim, path, config)

    def search(
        self, vector: np.ndarray, k: int, condition: Any, scope: Scope, whole_tenant: bool
    ) -> Ranking:
        """The index searched whole when the call asks for a whole tenant and the store
        holds no other, else restricted to the rowids the database allows. The caller
        fetches hits under the scope again, so a record another process writes in between
        can never slip in. The allowed rowids are read before the lock is taken, so writers
        (whose `wrote` needs it) wait for the index search only, not for that query."""
        allowed = None
        if not (whole_tenant and self._records.only_tenant(scope.tenant_id)):
            allowed = self._records.rowids_where(condition)
        with self._lock:
            self._mirror.refresh()
            scores, ids = self._mirror.index.search(vector, k, allowed)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

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
        """The FAISS ranking, then its records read from the table by `fetch`."""
        return fetch(self.search(vector, k, condition, scope, whole_tenant))

    def wrote(self, seq: int, rowids: np.ndarray, vectors: np.ndarray | None) -> None:
        """Apply the write to the index now (others' writes come through the log)."""
        with self._lock:
            self._mirror.wrote(seq, rowids, vectors)

    def count(self) -> int:
        """Vectors in the index once caught up."""
        with self._lock:
            self._mirror.refresh()
            return len(self._mirror.index)

    def save(self) -> None:
        """Save the index if it moved since it was loaded or saved."""
        with self._lock:
            if self._mirror.dirty:
                self._mirror.save()

    def bulk_load(self) -> AbstractContextManager[None]:
        """Nothing to set aside: FAISS takes batched adds at full speed."""
        return nullcontext()


def open_vector_search(
    records: RecordStore, dim: int, path: Path | None, config: IndexConfig
) -> VectorSearch:
    """The vector search for the records' database."""
    if records.dialect == "postgresql":
        from memlayer.retrievers.pg_vector import PgVectorSearch

        return PgVectorSearch(records, config)
    return MirroredVectorSearch(records, dim, path, config)
