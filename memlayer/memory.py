"""`Memory`: the semantic memory an agent writes to and recalls from, persistent and offline.

Composes the pieces below it: chunking, an embedder, the SQL records (the source of truth),
the retriever (a FAISS vector index caught up from the records' change log, so many `Memory`
objects and processes can share one folder; BM25 keyword search; reciprocal-rank fusion) and
context strategies. It validates every argument and leaves the work to them.

Every call works inside one tenant (`tenant_id`, None for the default tenant); record ids are
unique per tenant, and a by-id call sees only the records of the scope it names.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from memlayer.chunking import chunk_stream
from memlayer.config import DatabaseOptions, Limits, Settings
from memlayer.context import STRATEGIES, Candidates, Context, ContextStrategy
from memlayer.embedders import Embedder, embed_checked, resolve_embedder
from memlayer.errors import ClosedError, InvalidInputError, NotFoundError
from memlayer.group_commit import GroupCommit
from memlayer.retrievers.keywords import index_text
from memlayer.retrievers.pg_vector import check_filter_keys
from memlayer.retrievers.search import MODES, Retriever, SearchMode, SearchPlan
from memlayer.retrievers.vector_index import IndexConfig, check_device_available
from memlayer.stores import filters as filter_rules
from memlayer.stores.database import sqlite_url
from memlayer.stores.records import NewRecord, Record, RecordStore
from memlayer.tokens import Tokenizer, resolve_tokenizer
from memlayer.types import Hit, Scope, check_unicode, new_id

log = logging.getLogger(__name__)

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
        search_plan: SearchPlan | None = None,
        limits: Limits | None = None,
        database: DatabaseOptions | None = None,
    ):
        settings = Settings()
        if index_config is None and settings.filter_keys():
            index_config = IndexConfig(pg_filter_keys=settings.filter_keys())
        if index_config is not None:
            check_device_available(index_config)  # before a database is created
        if path is None and url is None:
            url = settings.url
        folder = memory_folder(path, url, settings)
        self.path = folder
        self.chunk_tokens = chunk_tokens
        self.overlap = overlap
        self.limits = limits or Limits()
        self._lock = threading.RLock()
        self._group_commit = GroupCommit(self._commit_batches, self._lock)
        self._closed = False
        self._strategies: dict[str, ContextStrategy] = {}
        self.embedder = resolve_embedder(embedder if embedder is not None else settings.embedder)
        # the records database, which other components (the HTTP service) may share
        self.url = database_url(folder, url)
        if index_config is not None and self.url.startswith("postgresql"):
            check_filter_keys(index_config, self.embedder.dim)  # before a database is created
        self._records = RecordStore(
            self.url,
            embedder_name=self.embedder.name,
            dim=self.embedder.dim,
            keywords=index_text,
            options=database or settings.database(),
        )
        self._retriever = Retriever(
            self._records,
            lambda texts: embed_checked(self.embedder, texts),
            self.embedder.dim,
            folder / INDEX_FILE if folder is not None else None,
            index_config,
            search_plan,
        )

    # -- writes ---------------------------------------------------------------------------

    def add(
        self,
        text: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        id: str | None = None,
        **scope: str | None,
    ) -> str:
        """Store `text`; an `id` that exists in this tenant is replaced. Returns the id."""
        return self.add_many([{"text": text, "metadata": metadata, "id": id}], **scope)[0]

    def add_many(self, items: Iterable[str | Mapping[str, Any]], **scope: str | None) -> list[str]:
        """Store many texts (strings or dicts with text/metadata/id) with one embedding batch."""
        owner = Scope.of(scope)
        rows = self._validated_items(items, self.limits.max_batch)
        self._store(rows, owner)
        return [rid for _, _, rid in rows]

    def bulk_add(
        self,
        items: Iterable[str | Mapping[str, Any]],
        *,
        batch_size: int = 1000,
        progress: bool = True,
        **scope: str | None,
    ) -> list[str]:
        """Store a large load (any number of items, as `add_many` takes them), fastest.

        Every item is checked before anything is stored. On PostgreSQL the HNSW index is
        dropped for the load and built once after it: meanwhile searches (every worker's)
        rank exactly, correct but slower, and writers wait while the index builds. On SQLite
        this is `add_many` batch by batch. Returns the ids in order.
        """
        from tqdm.auto import tqdm

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError("batch_size", "must be an integer >= 1", batch_size)
        owner = Scope.of(scope)
        rows = self._validated_items(items, None)
        self._check_open()
        bar = tqdm(total=len(rows), desc="bulk add", unit=" records", disable=not progress)
        with bar, self.bulk_loading():
            for start in range(0, len(rows), batch_size):
                self._store(rows[start : start + batch_size], owner)
                bar.update(min(batch_size, len(rows) - start))
        return [rid for _, _, rid in rows]

    @contextmanager
    def bulk_loading(self) -> Iterator[None]:
        """Around a large load of many scopes (`add_many` per user, say), as `bulk_add` is
        around one: on PostgreSQL the HNSW and filter indexes are dropped for the load and
        built once after it (searches rank exactly meanwhile); on SQLite nothing changes."""
        self._check_open()
        with self._retriever.bulk_load():
            yield

    def _validated_items(
        self, items: Iterable[str | Mapping[str, Any]], cap: int | None
    ) -> list[tuple[str, dict[str, Any], str]]:
        """Each item checked (text, metadata, id), at most `cap` of them, no id twice."""
        rows = []
        for index, item in enumerate(items):
            if index == cap:
                raise InvalidInputError(
                    "items", f"must hold at most {cap} items (Limits.max_batch)"
                )
            rows.append(self._validated_item(item, index))
        ids = [rid for _, _, rid in rows]
        if len(set(ids)) != len(ids):
            raise InvalidInputError("items", "must not repeat an id within one call")
        return rows

    def _store(self, rows: list[tuple[str, dict[str, Any], str]], owner: Scope) -> None:
        """Embed checked rows in one batch and upsert them in one transaction."""
        if not rows:
            return
        vectors = embed_checked(self.embedder, [text for text, _, _ in rows])
        new = [
            NewRecord(id=rid, text=text, metadata=meta, scope=owner, embedding=vector)
            for (text, meta, rid), vector in zip(rows, vectors, strict=True)
        ]
        if self._records.logs_changes:
            self._group_commit.submit((new, vectors))
            return
        with self._writing():
            rowids, seq = self._records.upsert(new)
            self._retriever.wrote(seq, rowids, vectors)

    def _commit_batches(self, batches: list[tuple[list[NewRecord], np.ndarray]]) -> None:
        """Upsert several writers' batches in one transaction (SQLite: one fsync for all)
        and hand them to the vector index; runs under `_lock` (see GroupCommit)."""
        self._check_open()
        new = [record for records, _ in batches for record in records]
        rowids, seq = self._records.upsert(new)
        written = np.asarray(rowids, dtype=np.int64)
        vectors = np.concatenate([vectors for _, vectors in batches])
        # two writers may have replaced one id in this transaction: the later write stands
        _, from_end = np.unique(written[::-1], return_index=True)
        last = np.sort(len(written) - 1 - from_end)
        self._retriever.wrote(seq, written[last].tolist(), vectors[last])

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
        self,
        id: str,
        text: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        **scope: str | None,
    ) -> None:
        """Change the text (re-embedded) and/or replace the metadata of the record `id` in
        `scope`; NotFoundError when the scope holds no such record."""
        owner = Scope.of(scope)
        condition = self._records.condition(owner, id=_check_id(id))
        if text is not None:
            self._check_text(text, "text")
        meta = self._check_metadata(metadata) if metadata is not None else None
        vector = embed_checked(self.embedder, [text]) if text is not None else None
        with self._writing():
            written = self._records.update(condition, text=text, metadata=meta, embedding=vector)
            if written is None:
                raise NotFoundError("record", id)
            rowid, seq = written
            self._retriever.wrote(seq, [rowid], vector)

    def delete(self, id: str, **scope: str | None) -> None:
        """Delete the record `id` in `scope`; NotFoundError when the scope holds no such record."""
        condition = self._records.condition(Scope.of(scope), id=_check_id(id))
        with self._writing():
            if not self._delete_where(condition):
                raise NotFoundError("record", id)

    def delete_many(self, ids: Iterable[str], **scope: str | None) -> int:
        """Delete the records with these ids in `scope` in one transaction; ids the scope does
        not hold are skipped. Returns how many were deleted."""
        wanted = [_check_id(rid) for rid in _id_list(ids)]
        if not wanted:
            return 0
        condition = self._records.condition(Scope.of(scope), ids=wanted)
        with self._writing():
            return self._delete_where(condition)

    def delete_scope(self, **scope: str | None) -> int:
        """Delete every record in a scope (at least one scope field is required)."""
        owner = Scope.of(scope)
        if not owner.as_dict():
            raise InvalidInputError("scope", "name at least one scope field to delete a scope")
        with self._writing():
            return self._delete_where(self._records.condition(owner))

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Around a write, once the memory is checked open. SQLite: under `_lock`, so this
        process's writes reach its vector index in sequence order (and SQLite admits one
        writer anyway). PostgreSQL: no lock (no index state in the process), so writes of
        many threads run, and commit, together instead of queueing here."""
        if not self._records.logs_changes:
            self._check_open()
            yield
            return
        with self._lock:
            self._check_open()
            yield

    def _delete_where(self, condition: Any) -> int:
        rowids, seq = self._records.delete_where(condition)
        if rowids:
            self._retriever.wrote(seq, rowids, None)
        return len(rowids)

    # -- reads ----------------------------------------------------------------------------

    def get(self, id: str, **scope: str | None) -> Hit | None:
        """The record `id` in `scope` as a Hit (score 1.0), or None when the scope has none."""
        condition = self._records.condition(Scope.of(scope), id=_check_id(id))
        self._check_open()
        found = self._records.fetch_where(condition)
        return _hit(found[0], 1.0) if found else None

    def get_many(self, ids: Iterable[str], **scope: str | None) -> list[Hit]:
        """The records with these ids in `scope`, in the order asked (score 1.0); ids the
        scope does not hold are left out."""
        wanted = [_check_id(rid) for rid in _id_list(ids)]
        if not wanted:
            return []
        condition = self._records.condition(Scope.of(scope), ids=wanted)
        self._check_open()
        found = {record.id: record for record in self._records.fetch_where(condition)}
        return [_hit(found[rid], 1.0) for rid in dict.fromkeys(wanted) if rid in found]

    def scan(
        self,
        *,
        filters: Mapping[str, Any] | None = None,
        limit: int | None = None,
        offset: int = 0,
        **scope: str | None,
    ) -> list[Hit]:
        """Every record in the scope matching `filters`, in the order they were first written
        (score 1.0); at most `limit`, after skipping `offset` (pages). For listing, not for
        ranking: no query, no index."""
        owner = Scope.of(scope)
        bad_limit = isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        if limit is not None and bad_limit:
            raise InvalidInputError("limit", "must be an integer >= 0", limit)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidInputError("offset", "must be an integer >= 0", offset)
        filter_rules.validate(filters)
        self._check_open()
        condition = self._records.condition(owner, filters)
        records = self._records.fetch_where(
            condition, oldest_first=True, limit=limit, offset=offset
        )
        return [_hit(record, 1.0) for record in records]

    def count(self, *, filters: Mapping[str, Any] | None = None, **scope: str | None) -> int:
        """How many records are in the scope (and match `filters`)."""
        owner = Scope.of(scope)
        filter_rules.validate(filters)
        self._check_open()
        return self._records.count_where(self._records.condition(owner, filters))

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

    def search_by_vector(
        self,
        vector: Sequence[float] | np.ndarray,
        *,
        k: int = 5,
        filters: Mapping[str, Any] | None = None,
        **scope: str | None,
    ) -> list[Hit]:
        """The k records nearest to a query vector of the embedder's width (cosine; the
        vector need not be unit length), for callers that embed queries themselves."""
        query = _query_vector(vector, self.embedder.dim).reshape(1, -1)
        ranked = self._ranked(None, k, filters, "vector", Scope.of(scope), query)
        return [_hit(record, score) for record, score in ranked]

    def _search(
        self, query: str, k: int, filters: Mapping[str, Any] | None, mode: Any, owner: Scope
    ) -> list[Hit]:
        return [
            _hit(record, score) for record, score in self._ranked(query, k, filters, mode, owner)
        ]

    def _ranked(
        self,
        query: str | None,
        k: int,
        filters: Mapping[str, Any] | None,
        mode: Any,
        owner: Scope,
        vector: np.ndarray | None = None,
        embeddings: bool = False,
    ) -> list[tuple[Record, float]]:
        """The k best records with their scores, best first (validated like `search`); a
        vector-mode call may give only the query's `vector`."""
        if query is not None or vector is None or mode != "vector":
            self._check_text(query, "query")
        _check_k(k)
        if mode not in MODES:
            raise InvalidInputError("mode", f"must be one of {', '.join(MODES)}", mode)
        filter_rules.validate(filters)
        self._check_open()
        return self._retriever.search(query, k, mode, owner, filters, vector, embeddings)

    def context(
        self,
        query: str,
        *,
        budget_tokens: int,
        k: int = 20,
        strategy: str | ContextStrategy = "ranked",
        tokenizer: Any = None,
        filters: Mapping[str, Any] | None = None,
        **scope: str | None,
    ) -> Context:
        """What memory holds for `query`, packed into one prompt string of at most
        `budget_tokens` tokens by `strategy`: "ranked" (the k best hits, best first), "crag"
        (clustered: one compact representative per cluster of a wide candidate set; k is
        the least number of candidates) or a strategy instance such as
        `CragContext(summarizer=...)`. Tokens are counted with `tokenizer` (None: the
        embedder's own; "words"; a tokenizer with `encode`; or a `str -> int` callable)."""
        if (
            isinstance(budget_tokens, bool)
            or not isinstance(budget_tokens, int)
            or budget_tokens < 1
        ):
            raise InvalidInputError("budget_tokens", "must be an integer >= 1", budget_tokens)
        packer = self._strategy(strategy)
        owner = Scope.of(scope)
        self._check_text(query, "query")
        _check_k(k)
        filter_rules.validate(filters)
        count = resolve_tokenizer(tokenizer, self.embedder)
        return packer.pack(_Recall(self, query, k, filters, owner, count), budget_tokens)

    def _strategy(self, strategy: str | ContextStrategy) -> ContextStrategy:
        """A strategy instance: the one given, or this Memory's own instance of a named one
        (kept, so a strategy's caches serve every call)."""
        if not isinstance(strategy, str):
            if callable(getattr(strategy, "pack", None)):
                return strategy
            names = ", ".join(STRATEGIES.names())
            raise InvalidInputError("strategy", f"must be one of {names} or have pack()", strategy)
        made = self._strategies.get(strategy)  # no lock when made: writers hold it
        if made is not None:
            return made
        with self._lock:
            if strategy not in self._strategies:
                self._strategies[strategy] = STRATEGIES.create(strategy)
            return self._strategies[strategy]

    def stats(self) -> dict[str, Any]:
        """Counts and locations over every tenant, for the CLI and monitoring."""
        self._check_open()
        vectors = self._retriever.vectors()
        return {
            "records": self._records.count_where(self._records.everything()),
            "vectors": vectors,
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
            self._retriever.save()

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

    # -- input rules ----------------------------------------------------------------------

    def _validated_item(
        self, item: str | Mapping[str, Any], index: int
    ) -> tuple[str, dict[str, Any], str]:
        if isinstance(item, str):
            return self._check_text(item, f"items[{index}]"), {}, new_id()
        if not isinstance(item, Mapping):
            raise InvalidInputError(f"items[{index}]", "must be a string or a dict with 'text'")
        unknown = set(item) - {"text", "metadata", "id"}
        if unknown:
            raise InvalidInputError(f"items[{index}].{sorted(unknown)[0]}", "unknown key")
        field = "" if index == 0 else f"items[{index}]."
        text = self._check_text(item.get("text"), f"{field}text")
        meta = self._check_metadata(item.get("metadata"), f"{field}metadata")
        rid = item.get("id")
        return text, meta, new_id() if rid is None else _check_id(rid)

    def _check_text(self, text: object, field: str) -> str:
        if not isinstance(text, str):
            raise InvalidInputError(field, "must be a string", type(text).__name__)
        if not text.strip():
            raise InvalidInputError(field, "must not be empty")
        if len(text) > self.limits.max_text_chars:
            raise InvalidInputError(
                field,
                f"must be at most {self.limits.max_text_chars} characters "
                "(Limits.max_text_chars; ingest() chunks long documents)",
                f"{len(text)} characters",
            )
        return check_unicode(text, field)

    def _check_metadata(
        self, metadata: Mapping[str, Any] | None, field: str = "metadata"
    ) -> dict[str, Any]:
        if metadata is None:
            return {}
        if not isinstance(metadata, Mapping):
            raise InvalidInputError(field, "must be a dict", type(metadata).__name__)
        try:
            encoded = json.dumps(dict(metadata), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(field, f"must be JSON-serializable ({exc})") from exc
        check_unicode(json.dumps(dict(metadata), ensure_ascii=False), field)
        size = len(encoded.encode())
        if size > self.limits.max_metadata_bytes:
            raise InvalidInputError(
                field,
                f"must encode to at most {self.limits.max_metadata_bytes} bytes of JSON "
                "(Limits.max_metadata_bytes)",
                f"{size} bytes",
            )
        decoded = dict(json.loads(encoded))
        if _depth(decoded) > self.limits.max_metadata_depth:
            raise InvalidInputError(
                field,
                f"must nest at most {self.limits.max_metadata_depth} levels "
                "(Limits.max_metadata_depth)",
            )
        return decoded


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def memory_folder(path: str | Path | None, url: str | None, settings: Settings) -> Path | None:
    """The folder for the database (unless a URL is given) and the vector index, created."""
    if path is None and url is not None:
        return None
    if isinstance(path, str) and _URL.match(path):
        raise InvalidInputError("path", "is a database URL; pass it as Memory(url=...)", path)
    folder = Path(path) if path is not None else settings.data_dir
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError("path", "must be a folder, not a file", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def database_url(folder: Path | None, url: str | None) -> str:
    """The records database's URL: the one given, else the SQLite file in the folder."""
    return sqlite_url(folder / DB_FILE) if url is None and folder is not None else str(url)


def _check_k(k: object) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError("k", "must be an integer >= 1", k)


def _check_id(record_id: object) -> str:
    if not isinstance(record_id, str) or not record_id or len(record_id) > _MAX_ID_LEN:
        raise InvalidInputError("id", f"must be a non-empty string of at most {_MAX_ID_LEN} chars")
    return check_unicode(record_id, "id")


def _id_list(ids: object) -> list[object]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise InvalidInputError("ids", "must be a list of ids, not a single id or a scalar")
    return list(ids)


def _query_vector(vector: object, dim: int) -> np.ndarray:
    """A query vector as one unit float32 row, or InvalidInputError naming the rule."""
    try:
        array = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError("vector", "must be a sequence of numbers") from exc
    if array.shape != (dim,):
        raise InvalidInputError("vector", f"must have shape ({dim},)", array.shape)
    norm = float(np.linalg.norm(array))
    if not np.isfinite(array).all() or norm == 0.0:
        raise InvalidInputError("vector", "must be finite and not all zero")
    return array / norm


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value: 0 for a scalar, 1 for a flat dict or list."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _hit(record: Record, score: float) -> Hit:
    return Hit(
        id=record.id,
        text=record.text,
        score=score,
        metadata=record.metadata,
        scope=record.scope,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


class _Recall:
    """What `Memory.context` lets a strategy ask for one query (see `memlayer.context.Recall`):
    hybrid-ranked hits in the call's scope and filters, their stored embeddings, and the
    embedder; the query is embedded once per call."""

    def __init__(
        self,
        memory: Memory,
        query: str,
        k: int,
        filters: Mapping[str, Any] | None,
        owner: Scope,
        tokenizer: Tokenizer,
    ) -> None:
        self.query = query
        self.k = k
        self.embedder = memory.embedder.name
        self.tokenizer = tokenizer
        self._memory = memory
        self._filters = filters
        self._owner = owner
        self._vector: np.ndarray | None = None

    def hits(self, n: int) -> list[Hit]:
        return [_hit(record, score) for record, score in self._rank(n, embeddings=False)]

    def candidates(self, n: int) -> Candidates:
        ranked = self._rank(n, embeddings=True)
        dim = self._memory.embedder.dim
        vectors = np.array([record.embedding for record, _ in ranked], dtype=np.float32)
        return Candidates(
            hits=[_hit(record, score) for record, score in ranked],
            vectors=vectors.reshape(len(ranked), dim),
            query_vector=self._query_vector()[0],
        )

    def embed(self, texts: list[str]) -> np.ndarray:
        return embed_checked(self._memory.embedder, texts)

    def _rank(self, n: int, *, embeddings: bool) -> list[tuple[Record, float]]:
        return self._memory._ranked(
            self.query, n, self._filters, "hybrid", self._owner, self._query_vector(), embeddings
        )

    def _query_vector(self) -> np.ndarray:
        if self._vector is None:
            self._vector = embed_checked(self._memory.embedder, [self.query])
        return self._vector
