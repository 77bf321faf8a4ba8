"""Keyword (BM25) retrieval over the records table, one implementation per database.

The records table keeps, beside each text, its keyword string (`keywords.index_text`); a
keyword index ranks records by BM25 over those strings. SQLite's FTS5 does it here; a
PostgreSQL full-text implementation plugs in through `open_keyword_index`.
"""

from __future__ import annotations

from typing import Any, Protocol

from memlayer.errors import InvalidInputError
from memlayer.retrievers.keywords import match_query
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


class NoKeywordIndex:
    """A database without a keyword index yet: keyword and hybrid search are refused."""

    def __init__(self, dialect: str) -> None:
        self._dialect = dialect

    def search(self, query: str, k: int, condition: Any) -> list[tuple[int, float]]:
        raise InvalidInputError(
            "mode", "keyword and hybrid search need SQLite (FTS5) in this release", self._dialect
        )


def open_keyword_index(records: RecordStore) -> KeywordIndex:
    """The keyword index for the records' database."""
    if records.dialect == "sqlite":
        return FTS5KeywordIndex(records)
    return NoKeywordIndex(records.dialect)
