"""`Memory`: the semantic memory an agent writes to and recalls from, persistent and offline.

Composes the pieces below it: chunking, an embedder, the SQL records (source of truth), a
FAISS vector index (a cache of the records' embeddings, rebuilt when stale), BM25 through
SQLite FTS5, reciprocal-rank fusion and context strategies.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from memlayer.chunking import chunk_stream
from memlayer.config import Settings
from memlayer.context import Context, get_strategy
from memlayer.embedders import Embedder, embed_checked, resolve_embedder
from memlayer.errors import ClosedError, CorruptionError, InvalidInputError, NotFoundError
from memlayer.retrievers.fusion import reciprocal_rank_fusion
from memlayer.retrievers.vector_index import IndexConfig, VectorIndex
from memlayer.stores import filters as filter_rules
from memlayer.stores.database import sqlite_url
from memlayer.stores.records import NewRecord, Record, RecordStore
from memlayer.types import Hit, Scope, new_id

log = logging.getLogger(__name__)

SearchMode = Literal["hybrid", "vector", "keyword"]
MODES = ("hybrid", "vector", "keyword")
_WORDS = re.compile(r"\w+", re.UNICODE)
_MAX_ID_LEN = 128
DB_FILE = "memory.db"
INDEX_FILE = "vectors.idx"


class Memory:
    """Remember texts under scopes; recall them by meaning and keywords.

    >>> with Memory(path="./agent-memory", embedder="hash") as memory:
    ...     _ = memory.add("The user prefers window seats.", user_id="ada")
    ...     memory.search("seat preference", user_id="ada")[0].text
    'The user prefers window seats.'
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        url: str | None = None,
        embedder: Embedder | str | Path | Callable[[list[str]], Any] | None = None,
        chunk_tokens: int = 200,
        overlap: int = 40,
        index_config: IndexConfig | None = None,
    ):
        folder = _folder(path, url)
        self.path = folder
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap
        self._lock = threading.RLock()
        self._closed = False
        self.embedder = resolve_embedder(embedder)
        self._records = RecordStore(
            sqlite_url(folder / DB_FILE) if url is None and folder is not None else str(url),
            embedder_name=self.embedder.name,
            dim=self.embedder.dim,
        )
        self._index_path = folder / INDEX_FILE if folder is not None else None
        self._index_config = index_config or IndexConfig()
        self._index = self._open_index()
        self._dirty = False

    def _open_index(self) -> VectorIndex:
        seq = self._records.seq()
        if self._index_path is not None and self._index_path.exists():
            try:
                index, applied = VectorIndex.load(self._index_path, self._index_config)
                if applied == seq and index.dim == self.embedder.dim:
                    return index
                log.info("vector index is stale (seq %s, database %s): rebuilding", applied, seq)
            except CorruptionError as exc:
                log.warning("%s: rebuilding from the database", exc)
        index = VectorIndex(self.embedder.dim, self._index_config)
        for rowids, vectors in self._records.iter_embeddings():
            index.add(rowids, vectors)
        return index

    # -- writes ---------------------------------------------------------------------------

    def add(
        self,
        text: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        id: str | None = None,
        **scope: str | None,
    ) -> str:
        """Store `text` (an existing `id` is updated in place); returns the record id."""
        return self.add_many([{"text": text, "metadata": metadata, "id": id}], **scope)[0]

    def add_many(self, items: Iterable[str | Mapping[str, Any]], **scope: str | None) -> list[str]:
        """Store many texts (strings or dicts with text/metadata/id) with one embedding batch."""
        owner = Scope.of(scope)
        rows = [self._validated_item(item, index) for index, item in enumerate(items)]
        if not rows:
            return []
        vectors = embed_checked(self.embedder, [text for text, _, _ in rows])
        new = [
            NewRecord(id=rid, text=text, metadata=meta, scope=owner, embedding=vector)
            for (text, meta, rid), vector in zip(rows, vectors, strict=True)
        ]
        with self._lock:
            self._check_open()
            written = self._records.upsert(new)
            self._index.add(np.asarray([rowid for rowid, _ in written]), vectors)
            self._dirty = True
        return [record.id for record in new]

    def ingest(
        self,
        stream: Iterable[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        batch_size: int = 64,
        progress: bool = True,
        **scope: str | None,
    ) -> int:
        """Chunk a stream of text into overlapping token windows and store each; returns the count.

        The stream is read lazily and written in batches, so memory stays bounded.
        """
        from tqdm.auto import tqdm

        if isinstance(stream, str):
            stream = [stream]
        Scope.of(scope)
        stored = 0
        batch: list[Mapping[str, Any]] = []
        with tqdm(desc="ingest", unit=" chunks", disable=not progress) as bar:
            for position, chunk in enumerate(
                chunk_stream(stream, chunk_tokens=self.chunk_tokens, overlap=self.overlap)
            ):
                batch.append({"text": chunk, "metadata": {**(metadata or {}), "chunk": position}})
                if len(batch) == batch_size:
                    stored += len(self.add_many(batch, **scope))
                    bar.update(len(batch))
                    batch = []
            if batch:
                stored += len(self.add_many(batch, **scope))
                bar.update(len(batch))
        return stored

    def update(
        self, id: str, text: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Change a record's text (re-embedded) and/or replace its metadata."""
        if text is not None:
            _check_text(text, "text")
        meta = _check_metadata(metadata) if metadata is not None else None
        vector = embed_checked(self.embedder, [text])[0] if text is not None else None
        with self._lock:
            self._check_open()
            record = self._records.by_id(_check_id(id))
            if record is None:
                raise NotFoundError("record", id)
            self._records.update(record.rowid, text=text, metadata=meta, embedding=vector)
            if vector is not None:
                self._index.add(np.asarray([record.rowid]), vector[None, :])
                self._dirty = True

    def delete(self, id: str) -> None:
        """Delete one record; NotFoundError if it does not exist."""
        with self._lock:
            self._check_open()
            rowids = self._records.delete_where(self._records.records.c.id == _check_id(id))
            if not rowids:
                raise NotFoundError("record", id)
            self._forget(rowids)

    def delete_scope(self, **scope: str | None) -> int:
        """Delete every record in a scope (at least one scope field is required)."""
        owner = Scope.of(scope)
        if not owner.as_dict():
            raise InvalidInputError("scope", "name at least one scope field to delete a scope")
        with self._lock:
            self._check_open()
            rowids = self._records.delete_where(self._records.condition(owner, None))
            self._forget(rowids)
            return len(rowids)

    def _forget(self, rowids: Sequence[int]) -> None:
        if rowids:
            self._index.remove(np.asarray(rowids, dtype=np.int64))
            self._dirty = True

    # -- reads ----------------------------------------------------------------------------

    def get(self, id: str) -> Hit | None:
        """The record with this id as a Hit (score 1.0), or None."""
        self._check_open()
        record = self._records.by_id(_check_id(id))
        return None if record is None else _hit(record, 1.0)

    def count(self, *, filters: Mapping[str, Any] | None = None, **scope: str | None) -> int:
        """How many records are in the scope (and match `filters`)."""
        self._check_open()
        filter_rules.validate(filters)
        return self._records.count_where(self._records.condition(Scope.of(scope), filters))

    def search(
        self,
        query: str,
        *,
        k: int = 5,
        filters: Mapping[str, Any] | None = None,
        mode: SearchMode = "hybrid",
        **scope: str | None,
    ) -> list[Hit]:
        """The k best records in the scope matching `filters`, best first.

        When at least k records match, exactly k come back. `mode`: "vector" (meaning),
        "keyword" (BM25), or "hybrid" (both, fused by reciprocal rank).
        """
        return self._search(query, k, filters, mode, Scope.of(scope))

    def _search(
        self, query: str, k: int, filters: Mapping[str, Any] | None, mode: str, owner: Scope
    ) -> list[Hit]:
        _check_text(query, "query")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInputError("k", "must be an integer >= 1", k)
        if mode not in MODES:
            raise InvalidInputError("mode", f"must be one of {', '.join(MODES)}", mode)
        filter_rules.validate(filters)
        self._check_open()
        condition = self._records.condition(owner, filters)
        restricted = bool(owner.as_dict()) or bool(filters)
        pool = k if mode != "hybrid" else max(4 * k, 40)
        rankings: list[list[tuple[int, float]]] = []
        if mode in ("vector", "hybrid"):
            rankings.append(self._vector_ranking(query, pool, condition, restricted))
        if mode in ("keyword", "hybrid"):
            words = [word.lower() for word in _WORDS.findall(query)]
            rankings.append(self._records.keyword_search(words, pool, condition))
        ranked = rankings[0] if len(rankings) == 1 else reciprocal_rank_fusion(rankings)
        ranked = ranked[:k]
        records = self._records.fetch([rowid for rowid, _ in ranked])
        return [_hit(records[rowid], score) for rowid, score in ranked if rowid in records]

    def _vector_ranking(
        self, query: str, k: int, condition: Any, restricted: bool
    ) -> list[tuple[int, float]]:
        vector = embed_checked(self.embedder, [query])
        allowed = self._records.rowids_where(condition) if restricted else None
        with self._lock:
            scores, ids = self._index.search(vector, k, allowed)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def context(
        self,
        query: str,
        *,
        budget_tokens: int,
        k: int = 20,
        strategy: str = "ranked",
        filters: Mapping[str, Any] | None = None,
        **scope: str | None,
    ) -> Context:
        """The best hits for `query` packed into one prompt string within `budget_tokens`."""
        if (
            isinstance(budget_tokens, bool)
            or not isinstance(budget_tokens, int)
            or budget_tokens < 1
        ):
            raise InvalidInputError("budget_tokens", "must be an integer >= 1", budget_tokens)
        packer = get_strategy(strategy)
        hits = self._search(query, k, filters, "hybrid", Scope.of(scope))
        return packer.pack(hits, budget_tokens)

    def stats(self) -> dict[str, Any]:
        """Counts and locations, for the CLI and monitoring."""
        self._check_open()
        return {
            "records": self._records.count_where(self._records.condition(Scope(), None)),
            "vectors": len(self._index),
            "embedder": self.embedder.name,
            "dim": self.embedder.dim,
            "path": str(self.path) if self.path else None,
            "database": self._records.dialect,
        }

    # -- lifecycle ------------------------------------------------------------------------

    def flush(self) -> None:
        """Save the vector index so the next open needs no rebuild (records are always durable)."""
        with self._lock:
            self._check_open()
            if self._dirty and self._index_path is not None:
                self._index.save(self._index_path, self._records.seq())
                self._dirty = False

    def close(self) -> None:
        """Save the index and release the database; further calls raise ClosedError."""
        with self._lock:
            if self._closed:
                return
            self.flush()
            self._records.close()
            self._closed = True

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("Memory")

    def _validated_item(
        self, item: str | Mapping[str, Any], index: int
    ) -> tuple[str, dict[str, Any], str]:
        if isinstance(item, str):
            return _check_text(item, f"items[{index}]"), {}, new_id()
        if not isinstance(item, Mapping):
            raise InvalidInputError(f"items[{index}]", "must be a string or a dict with 'text'")
        unknown = set(item) - {"text", "metadata", "id"}
        if unknown:
            raise InvalidInputError(f"items[{index}].{sorted(unknown)[0]}", "unknown key")
        text = _check_text(item.get("text"), "text" if index == 0 else f"items[{index}].text")
        meta = _check_metadata(item.get("metadata"))
        rid = item.get("id")
        return text, meta, new_id() if rid is None else _check_id(rid)


def _folder(path: str | Path | None, url: str | None) -> Path | None:
    """The folder for the database (unless a URL is given) and the vector index, created."""
    if path is None and url is not None:
        return None
    folder = Path(path) if path is not None else Settings().data_dir
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError("path", "must be a folder, not a file", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _check_text(text: object, field: str) -> str:
    if not isinstance(text, str):
        raise InvalidInputError(field, "must be a string", type(text).__name__)
    if not text.strip():
        raise InvalidInputError(field, "must not be empty")
    return text


def _check_id(record_id: object) -> str:
    if not isinstance(record_id, str) or not record_id or len(record_id) > _MAX_ID_LEN:
        raise InvalidInputError("id", f"must be a non-empty string of at most {_MAX_ID_LEN} chars")
    return record_id


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    import json

    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidInputError("metadata", "must be a dict", type(metadata).__name__)
    try:
        return dict(json.loads(json.dumps(dict(metadata), allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError("metadata", f"must be JSON-serializable ({exc})") from exc


def _hit(record: Record, score: float) -> Hit:
    return Hit(
        id=record.id,
        text=record.text,
        score=score,
        metadata=record.metadata,
        scope=record.scope,
        created_at=record.created_at,
    )
