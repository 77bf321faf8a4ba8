"""Keyword retrieval over the records table, one implementation per database.

The records table keeps, beside each text, its keyword string (`keywords.index_text`: folded
words, and character bigrams for scripts written without spaces); a keyword index ranks
records against a query's words over those strings. SQLite: FTS5 and BM25. PostgreSQL: a
generated `tsvector` of the same strings (the `simple` configuration: no stemming, so a term
matches what `index_text` made of it) under a GIN index, ranked by `ts_rank_cd`.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from memlayer.errors import InvalidInputError
from memlayer.retrievers.keywords import match_query, term_groups
from memlayer.stores.records import RecordStore

_FTS_DDL = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS records_fts USING fts5(keywords, content='records', "
    "content_rowid='rowid', tokenize='unicode61 remove_diacritics 0')",
    "CREATE TRIGGER IF NOT EXISTS records_ai AFTER INSERT ON records BEGIN "
    "INSERT INTO records_fts(rowid, keywords) VALUES (new.rowid, new.keywords); END",
    "CREATE TRIGGER IF NOT EXISTS records_ad AFTER DELETE ON records BEGIN "
    "INSERT INTO records_fts(records_fts, rowid, keywords) "
    "VALUES('delete', old.rowid, old.keywords); END",
    "CREATE TRIGGER IF NOT EXISTS records_au AFTER UPDATE OF keywords ON records BEGIN "
    "INSERT INTO records_fts(records_fts, rowid, keywords) "
    "VALUES('delete', old.rowid, old.keywords); "
    "INSERT INTO records_fts(rowid, keywords) VALUES (new.rowid, new.keywords); END",
)


class KeywordIndex(Protocol):
    """Ranks the records matching a SQL condition by BM25 against a query's words."""

    def search(self, query: str, k: int, condition: Any) -> list[tuple[int, float]]:
        """Top-k (rowid, score) best first; higher scores are better."""
        ...


class FTS5KeywordIndex:
    """SQLite FTS5 over the records' keyword strings, kept in step by triggers."""

    def __init__(self, records: RecordStore) -> None:
        self._records = records
        with records.write() as conn:
            present = conn.exec_driver_sql(
                "SELECT 1 FROM sqlite_master WHERE name = 'records_fts'"
            ).first()
            for ddl in _FTS_DDL:
                conn.exec_driver_sql(ddl)
            if present is None:  # new, or dropped by a migration: index what is there
                conn.exec_driver_sql("INSERT INTO records_fts(records_fts) VALUES('rebuild')")

    def search(self, query: str, k: int, condition: Any) -> list[tuple[int, float]]:
        from sqlalchemy import column, literal_column, select, table

        match = match_query(query)
        if match is None:
            return []
        records = self._records.records
        fts = table("records_fts", column("rowid"))
        score: Any = literal_column("bm25(records_fts)")
        stmt = (
            select(records.c.rowid, score)
            .select_from(fts.join(records, records.c.rowid == fts.c.rowid))
            .where(literal_column("records_fts").op("MATCH")(match), condition)
            .order_by(score)
            .limit(k)
        )
        with self._records.engine.connect() as conn:
            return [(int(rowid), -float(bm25)) for rowid, bm25 in conn.execute(stmt)]


class PostgresKeywordIndex:
    """PostgreSQL full-text search over the records' keyword strings.

    Each word of the query is a phrase of its terms and any word may match, as on SQLite.
    `ts_rank_cd` alone knows nothing of how rare a word is, so each word's cover-density
    rank is weighted by its inverse document frequency (BM25's), counted through the GIN
    index and capped at `count_cap` documents so a common word costs a bounded scan.
    """

    count_cap = 10_000

    def __init__(self, records: RecordStore) -> None:
        self._records = records
        with records.write() as conn:
            conn.exec_driver_sql(
                "ALTER TABLE records ADD COLUMN IF NOT EXISTS keywords_tsv tsvector "
                "GENERATED ALWAYS AS (to_tsvector('simple', keywords)) STORED"
            )
            conn.exec_driver_sql(
                "CREATE INDEX IF NOT EXISTS records_keywords_tsv ON records "
                "USING gin (keywords_tsv)"
            )

    def search(self, query: str, k: int, condition: Any) -> list[tuple[int, float]]:
        from sqlalchemy import func, literal_column, or_, select

        groups = sorted({" ".join(group) for group in term_groups(query)})
        if not groups:
            return []
        words = [func.phraseto_tsquery(literal_column("'simple'"), group) for group in groups]
        vector: Any = literal_column("keywords_tsv")
        records = self._records.records
        with self._records.engine.connect() as conn:
            weights = self._idf(conn, [vector.op("@@")(word) for word in words])
            score: Any = sum(
                weight * func.ts_rank_cd(vector, word, 1)
                for weight, word in zip(weights, words, strict=True)
            )
            stmt = (
                select(records.c.rowid, score)
                .where(or_(*(vector.op("@@")(word) for word in words)), condition)
                .order_by(score.desc(), records.c.rowid)
                .limit(k)
            )
            return [(int(rowid), float(rank)) for rowid, rank in conn.execute(stmt)]

    def _idf(self, conn: Any, matches: list[Any]) -> list[float]:
        """BM25's inverse document frequency of each word, over every record."""
        from sqlalchemy import func, literal, select

        rowid = self._records.records.c.rowid

        def capped_count(condition: Any) -> Any:
            hits = select(rowid).where(condition).limit(self.count_cap).subquery()
            return select(func.count()).select_from(hits).scalar_subquery()

        counts = conn.execute(select(*(capped_count(m) for m in matches))).one()
        estimate = conn.exec_driver_sql(
            "SELECT reltuples FROM pg_class WHERE relname = 'records'"
        ).scalar()
        total = float(estimate) if estimate is not None and estimate >= 0 else -1.0
        if total < max(counts):
            total = float(self._records.count_where(literal(True)))
        return [math.log(1.0 + (total - n + 0.5) / (n + 0.5)) for n in counts]


class NoKeywordIndex:
    """A database without a keyword index: keyword and hybrid search are refused."""

    def __init__(self, dialect: str) -> None:
        self._dialect = dialect

    def search(self, query: str, k: int, condition: Any) -> list[tuple[int, float]]:
        raise InvalidInputError(
            "mode", "keyword and hybrid search need SQLite or PostgreSQL", self._dialect
        )


def open_keyword_index(records: RecordStore) -> KeywordIndex:
    """The keyword index for the records' database."""
    if records.dialect == "sqlite":
        return FTS5KeywordIndex(records)
    if records.dialect == "postgresql":
        return PostgresKeywordIndex(records)
    return NoKeywordIndex(records.dialect)
