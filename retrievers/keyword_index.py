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

    def search(
        self, query: str, k: int, condition: Any, narrow: bool = False
    ) -> list[tuple[int, float]]:
        """Top-k (rowid, score) best first; higher scores are better. `narrow`: the condition
        names a scope below the tenant (a user, session or agent), so few records match it."""
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

    def search(
        self, query: str, k: int, condition: Any, narrow: bool = False
    ) -> list[tuple[int, float]]:
        """A narrow scope's rowids are read first (from the scope index) and each full-text
        match is tested against them: joining every match to its record instead costs a
        table lookup per match, 10x slower for a user's 50 of 5,000 records. A whole tenant
        is joined (its rowid set would cost more than it saves)."""
        from sqlalchemy import column, literal_column, select, table

        match = match_query(query)
        if match is None:
            return []
        records = self._records.records
        fts = table("records_fts", column("rowid"))
        score: Any = literal_column("bm25(records_fts)")
        matches = literal_column("records_fts").op("MATCH")(match)
        if narrow:
            # unary + keeps SQLite from handing the IN list to FTS5 as rowid lookups, each a
            # full-text query of its own
            inside = literal_column("+records_fts.rowid").in_(
                select(records.c.rowid).where(condition)
            )
            stmt = select(fts.c.rowid, score).where(matches, inside)
        else:
            stmt = (
                select(records.c.rowid, score)
                .select_from(fts.join(records, records.c.rowid == fts.c.rowid))
                .where(matches, condition)
            )
        stmt = stmt.order_by(score).limit(k)
        with self._records.engine.connect() as conn:
            return [(int(rowid), -float(bm25)) for rowid, bm25 in conn.execute(stmt)]


class PostgresKeywordIndex:
    """PostgreSQL full-text search over the records' keyword strings.

    Each word of the query is a phrase of its terms and any word may match, as on SQLite.
    `ts_rank_cd` alone knows nothing of how rare a word is, so each word's cover-density
    rank is weighted by its inverse document frequency (BM25's). A word that is one of the
    table's most common lexemes takes its document count from the planner's statistics
    (`pg_stats.most_common_elems`, refreshed by ANALYZE: the fraction of rows holding it
    times the table's rows); any other word is counted through the GIN index, capped at
    `count_cap` documents. Counting a common word read a few thousand rows per query
    (28 ms of a 43 ms search over 5,000 records); a rare word's count reads few.
    """

    count_cap = 10_000

    def __init__(self, records: RecordStore) -> None:
        self._records = records
        with records.schema_change() as conn:
            conn.exec_driver_sql(
                "ALTER TABLE records ADD COLUMN IF NOT EXISTS keywords_tsv tsvector "
                "GENERATED ALWAYS AS (to_tsvector('simple', keywords)) STORED"
            )
            conn.exec_driver_sql(
                "CREATE INDEX IF NOT EXISTS records_keywords_tsv ON records "
                "USING gin (keywords_tsv)"
            )

    def search(
        self, query: str, k: int, condition: Any, narrow: bool = False
    ) -> list[tuple[int, float]]:
        from sqlalchemy import func, literal_column, or_, select

        groups = sorted({" ".join(group) for group in term_groups(query)})
        if not groups:
            return []
        words = [func.phraseto_tsquery(literal_column("'simple'"), group) for group in groups]
        vector: Any = literal_column("keywords_tsv")
        records = self._records.records
        with self._records.engine.connect() as conn:
            weights = self._idf(conn, groups, [vector.op("@@")(word) for word in words])
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

    def _idf(self, conn: Any, groups: list[str], matches: list[Any]) -> list[float]:
        """BM25's inverse document frequency of each word, over every record."""
        from sqlalchemy import func, literal, select

        rowid = self._records.records.c.rowid

        def capped_count(condition: Any) -> Any:
            hits = select(rowid).where(condition).limit(self.count_cap).subquery()
            return select(func.count()).select_from(hits).scalar_subquery()

        estimate, frequencies = self._statistics(conn, groups)
        total = float(estimate) if estimate is not None and estimate >= 0 else -1.0
        counted = [i for i, share in enumerate(frequencies) if share is None or total < 0]
        counts = [share * total if share is not None else 0.0 for share in frequencies]
        if counted:
            found = conn.execute(select(*(capped_count(matches[i]) for i in counted))).one()
            for i, n in zip(counted, found, strict=True):
                counts[i] = float(n)
        if total < max(counts):
            total = float(self._records.count_where(literal(True)))
        return [math.log(1.0 + (total - n + 0.5) / (n + 0.5)) for n in counts]

    def _statistics(self, conn: Any, groups: list[str]) -> tuple[float | None, list[Any]]:
        """The planner's row estimate of the table (-1 before its first ANALYZE) and, per
        word, the fraction of rows holding it when the word is a single lexeme among the
        most common ones (None otherwise), in one query."""
        from sqlalchemy import bindparam, text

        stmt = text(
            "WITH common AS ("
            " SELECT e.lexeme, e.share FROM pg_stats AS s,"
            " unnest(s.most_common_elems::text::text[], s.most_common_elem_freqs)"
            " AS e(lexeme, share)"
            " WHERE s.schemaname = current_schema() AND s.tablename = 'records'"
            " AND s.attname = 'keywords_tsv'),"
            " words AS ("
            " SELECT w.n, tsvector_to_array(to_tsvector('simple', w.word)) AS lexemes"
            " FROM unnest(CAST(:words AS text[])) WITH ORDINALITY AS w(word, n))"
            " SELECT (SELECT reltuples FROM pg_class WHERE oid = to_regclass('records')),"
            " array_agg(c.share ORDER BY words.n) FROM words LEFT JOIN common AS c"
            " ON cardinality(words.lexemes) = 1 AND c.lexeme = words.lexemes[1]"
        ).bindparams(bindparam("words", value=list(groups)))
        estimate, shares = conn.execute(stmt).one()
        return estimate, [None if share is None else float(share) for share in shares]


class NoKeywordIndex:
    """A database without a keyword index: keyword and hybrid search are refused."""

    def __init__(self, dialect: str) -> None:
        self._dialect = dialect

    def search(
        self, query: str, k: int, condition: Any, narrow: bool = False
    ) -> list[tuple[int, float]]:
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
