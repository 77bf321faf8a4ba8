"""The search plan: which retrievers a mode asks, how many candidates each proposes, and how
their rankings are fused.

`Memory.search` validates its arguments and hands the query, mode, scope and filters to
`Retriever.search`, which ranks and reads the records of the hits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from memlayer.retrievers.fusion import reciprocal_rank_fusion
from memlayer.retrievers.keyword_index import open_keyword_index
from memlayer.retrievers.vector_index import IndexConfig
from memlayer.retrievers.vector_search import open_vector_search
from memlayer.stores.records import Record, RecordStore
from memlayer.types import Scope

SearchMode = Literal["hybrid", "vector", "keyword"]
MODES: tuple[SearchMode, ...] = ("hybrid", "vector", "keyword")
Ranking = list[tuple[int, float]]
Filters = Mapping[str, Any] | None


@dataclass(frozen=True)
class SearchPlan:
    """Candidates each retriever proposes for fusion in hybrid mode: k × `factor`, at least
    `minimum`, so a record ranked modestly by both can still win."""

    factor: int = 4
    minimum: int = 40

    def candidates(self, k: int, mode: SearchMode) -> int:
        """How many candidates to ask each retriever for."""
        return max(self.factor * k, self.minimum) if mode == "hybrid" else k


class Retriever:
    """Vector and keyword retrieval over one records table, fused by reciprocal rank."""

    def __init__(
        self,
        records: RecordStore,
        embed: Callable[[Sequence[str]], np.ndarray],
        dim: int,
        index_path: Path | None,
        index_config: IndexConfig | None = None,
        plan: SearchPlan | None = None,
    ) -> None:
        self._records = records
        self._embed = embed
        self._vectors = open_vector_search(records, dim, index_path, index_config or IndexConfig())
        self._keywords = open_keyword_index(records)
        self.plan = plan or SearchPlan()

    def search(
        self,
        query: str | None,
        k: int,
        mode: SearchMode,
        scope: Scope,
        filters: Filters = None,
        vector: np.ndarray | None = None,
        embeddings: bool = False,
    ) -> list[tuple[Record, float]]:
        """Best-first (record, score) of the records in `scope` matching `filters`, at most
        k, with their embeddings when asked; `vector` is the query's unit embedding (1, dim)
        when the caller has it already (a vector-mode call may give it without a text).

        The filters' SQL is built once. A vector-mode search reads its hits' records with
        the ranking where the database ranks (PostgreSQL: one statement); otherwise the
        records of the ranking are read after it, again under the scope and filters."""
        where = self._records.filter_clause(filters)
        condition = self._records.condition(scope, where=where)

        def fetch(ranked: Ranking) -> list[tuple[Record, float]]:
            rowids = [rowid for rowid, _ in ranked]
            found = self._records.fetch(rowids, scope, where, embeddings=embeddings)
            return [(found[rowid], score) for rowid, score in ranked if rowid in found]

        wanted = self.plan.candidates(k, mode)
        rankings: list[Ranking] = []
        if mode in ("vector", "hybrid"):
            whole_tenant = not filters and set(scope.as_dict()) <= {"tenant_id"}
            if vector is None:
                assert query is not None, "vector search needs a text or a vector"
                vector = self._embed([query])
            if mode == "vector":
                return self._vectors.search_records(
                    vector, k, condition, scope, whole_tenant, embeddings=embeddings, fetch=fetch
                )
            rankings.append(self._vectors.search(vector, wanted, condition, scope, whole_tenant))
        if mode in ("keyword", "hybrid"):
            assert query is not None, "keyword search needs a text query"
            narrow = bool(set(scope.as_dict()) - {"tenant_id"})
            rankings.append(self._keywords.search(query, wanted, condition, narrow))
        ranked = rankings[0] if len(rankings) == 1 else reciprocal_rank_fusion(rankings)
        return fetch(ranked[:k])

    def wrote(self, seq: int, rowids: Sequence[int], vectors: np.ndarray | None) -> None:
        """Apply this process's own committed write (vectors None: a delete)."""
        self._vectors.wrote(seq, np.asarray(rowids, dtype=np.int64), vectors)

    def vectors(self) -> int:
        """How many vectors are searchable."""
        return self._vectors.count()

    def bulk_load(self) -> AbstractContextManager[None]:
        """Around a large load (see `VectorSearch.bulk_load`)."""
        return self._vectors.bulk_load()

    def save(self) -> None:
        """Save what the vector search would otherwise rebuild on the next open."""
        self._vectors.save()
