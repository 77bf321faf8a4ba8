"""SQL tier: pages as binary rows through SQLAlchemy (SQLite by default, PostgreSQL to share).

Each page is one row holding `codec.encode`'s blob and its CRC32, written in a committed
transaction before `put` returns (`put_many`: one transaction for all its pages). A batch
read is one query. A row whose checksum fails is reported and never returned as data.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from memlayer.errors import ClosedError, CorruptionError, NotFoundError, StorageError
from memlayer.stores.codec import decode, encode
from memlayer.stores.database import create_tables, open_engine
from memlayer.stores.tier import Tier
from memlayer.types import Page

log = logging.getLogger(__name__)

_BATCH = 500  # ids per query of a batch read: within every database's limit on parameters


class SQLTier(Tier):
    """Pages in table `table` of the database at `url`."""

    persistent = True

    def __init__(
        self,
        url: str,
        *,
        table: str = "memlayer_pages",
        budget: int | None = None,
        name: str = "sql",
    ):
        super().__init__()
        from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table
        from sqlalchemy.exc import SQLAlchemyError

        self.name = name
        self.url = url
        self.budget = budget
        self._engine = open_engine(url)
        self._table = Table(
            table,
            MetaData(),
            Column("id", String(512), primary_key=True),
            Column("crc", Integer, nullable=False),
            Column("nbytes", Integer, nullable=False),
            Column("body", LargeBinary, nullable=False),
        )
        try:
            create_tables(self._engine, self._table.metadata)
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot open page table in {url}: {exc}") from exc
        self._closed = False

    def _run(self, statement: Any, *, write: bool = False) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        if self._closed:
            raise ClosedError(f"SQL tier at {self.url}")
        try:
            if write:
                with self._engine.begin() as conn:
                    return conn.execute(statement)
            with self._engine.connect() as conn:
                return conn.execute(statement).all()
        except SQLAlchemyError as exc:
            raise StorageError(f"database error in {self.url}: {exc}") from exc

    @property
    def nbytes(self) -> int:
        from sqlalchemy import func, select

        return int(self._run(select(func.coalesce(func.sum(self._table.c.nbytes), 0)))[0][0])

    def __contains__(self, page_id: object) -> bool:
        from sqlalchemy import select

        return bool(self._run(select(self._table.c.id).where(self._table.c.id == page_id)))

    def __len__(self) -> int:
        from sqlalchemy import func, select

        return int(self._run(select(func.count()).select_from(self._table))[0][0])

    def ids(self) -> Iterator[str]:
        from sqlalchemy import select

        return iter([row[0] for row in self._run(select(self._table.c.id))])

    def put(self, page: Page) -> list[Page]:
        return self.put_many([page])

    def put_many(self, pages: Sequence[Page]) -> list[Page]:
        """Upsert pages in one committed transaction (a SQL tier never evicts)."""
        from sqlalchemy import delete, insert
        from sqlalchemy.exc import SQLAlchemyError

        rows = []
        for page in pages:
            body = encode(page)
            rows.append({"id": page.id, "crc": _crc(body), "nbytes": len(body), "body": body})
        table = self._table
        if self._closed:
            raise ClosedError(f"SQL tier at {self.url}")
        try:
            with self._engine.begin() as conn:
                conn.execute(delete(table).where(table.c.id.in_([r["id"] for r in rows])))
                conn.execute(insert(table), rows)
        except SQLAlchemyError as exc:
            raise StorageError(f"database error in {self.url}: {exc}") from exc
        return []

    def get(self, page_id: str) -> Page:
        from sqlalchemy import select

        table = self._table
        rows = self._run(select(table.c.crc, table.c.body).where(table.c.id == page_id))
        if not rows:
            self.counters.misses += 1
            raise NotFoundError("page", page_id)
        return self._decode(page_id, *rows[0])

    def get_many(self, page_ids: Sequence[str], *, transient: bool = False) -> list[Page]:
        """The pages, read with one query per `_BATCH` ids."""
        from sqlalchemy import select

        table = self._table
        found: dict[str, tuple[int, bytes]] = {}
        unique = list(dict.fromkeys(page_ids))
        for start in range(0, len(unique), _BATCH):
            chosen = table.c.id.in_(unique[start : start + _BATCH])
            for page_id, crc, body in self._run(
                select(table.c.id, table.c.crc, table.c.body).where(chosen)
            ):
                found[page_id] = (crc, body)
        missing = next((page_id for page_id in page_ids if page_id not in found), None)
        if missing is not None:
            self.counters.misses += 1
            raise NotFoundError("page", missing)
        return [self._decode(page_id, *found[page_id]) for page_id in page_ids]

    def _decode(self, page_id: str, crc: int, body: bytes) -> Page:
        """The page a row holds, once its checksum passes."""
        if _crc(body) != crc:
            log.error("memlayer SQL tier %s: page %r failed its checksum", self.url, page_id)
            raise CorruptionError(f"page {page_id!r}: checksum mismatch in {self.url}")
        self.counters.hits += 1
        return decode(bytearray(body))

    def evict(self, page_id: str) -> None:
        from sqlalchemy import delete

        result = self._run(delete(self._table).where(self._table.c.id == page_id), write=True)
        if result.rowcount == 0:
            raise NotFoundError("page", page_id)

    def evict_prefix(self, prefix: str, *, keep: str | None = None) -> int:
        """Delete every page whose id starts with `prefix` (but not with `keep`); how many."""
        from sqlalchemy import delete

        chosen = self._table.c.id.startswith(prefix, autoescape=True)
        if keep is not None:
            chosen = chosen & ~self._table.c.id.startswith(keep, autoescape=True)
        return int(self._run(delete(self._table).where(chosen), write=True).rowcount)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine.dispose()


def _crc(body: bytes) -> int:
    """CRC32 as a signed 32-bit value, so it fits an INTEGER column everywhere."""
    value = zlib.crc32(body)
    return value - 2**32 if value >= 2**31 else value
