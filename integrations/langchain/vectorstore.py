"""`MemlayerVectorStore`: a LangChain `VectorStore` over a memlayer `Memory`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from langchain_core.vectorstores.utils import maximal_marginal_relevance

from memlayer import InvalidInputError, Memory
from memlayer.integrations.langchain.documents import MemoryPair, plain_document
from memlayer.integrations.langchain.embeddings import LangChainEmbedder, MemlayerEmbeddings

Filter = dict[str, Any] | None


class MemlayerVectorStore(VectorStore):
    """A vector store any LangChain code can use, kept in a memlayer `Memory`.

    Either hand it an open `memory` (it embeds with the memory's embedder), or let it open
    one at `path` / `url` embedding with `embedding` (any LangChain `Embeddings`; memlayer's
    MiniLM when omitted). Everything happens in the scope given (`tenant_id`, `user_id`,
    `agent_id`, `session_id`): ids are per tenant, and re-adding an id replaces that record.
    Filters use memlayer's Mongo-style syntax on metadata: `filter={"year": {"$gte": 2020}}`.
    Scores are cosine similarities; relevance scores map them onto [0, 1].
    """

    def __init__(
        self,
        memory: Any = None,
        *,
        embedding: Embeddings | None = None,
        path: str | Path | None = None,
        url: str | None = None,
        tenant_id: str | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
    ):
        if memory is not None and (embedding is not None or path is not None or url is not None):
            raise InvalidInputError(
                "memory",
                "give an open memory, or embedding/path/url for the store to open one; "
                "a Memory always embeds with its own embedder",
            )
        self._owns_memory = memory is None
        if memory is None:
            embedder = LangChainEmbedder(embedding) if embedding is not None else None
            memory = Memory(path=path, url=url, embedder=embedder)
        self._pair = MemoryPair.of(memory)
        local = self._pair.local("MemlayerVectorStore")  # it embeds with the memory's embedder
        self._embeddings = embedding or MemlayerEmbeddings(local.embedder)
        scope = {"tenant_id": tenant_id, "user_id": user_id, "agent_id": agent_id}
        scope["session_id"] = session_id
        self.scope = {k: v for k, v in scope.items() if v is not None}

    @property
    def memory(self) -> Memory:
        """The Memory the store reads and writes."""
        return self._pair.local("MemlayerVectorStore")

    @property
    def embeddings(self) -> Embeddings:
        """What embeds queries (and, through the memory, documents)."""
        return self._embeddings

    def close(self) -> None:
        """Close the memory if this store opened it."""
        if self._owns_memory:
            self._pair.sync.close()

    # -- writes ---------------------------------------------------------------------------

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Store texts (ids given are kept; an id already in the scope is replaced)."""
        written: list[str] = []
        for batch in self._batches(texts, metadatas, ids, kwargs):
            written += self._pair.sync.add_many(batch, **self.scope)
        return written

    async def aadd_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """See `add_texts`."""
        written: list[str] = []
        for batch in self._batches(texts, metadatas, ids, kwargs):
            written += await self._pair.aio.add_many(batch, **self.scope)
        return written

    def _batches(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None,
        ids: Sequence[str | None] | None,
        extra: dict[str, Any],
    ) -> list[list[dict[str, Any]]]:
        if extra:
            raise InvalidInputError(sorted(extra)[0], "is not an option of add_texts")
        texts = list(texts)
        for name, values in (("metadatas", metadatas), ("ids", ids)):
            if values is not None and len(values) != len(texts):
                raise InvalidInputError(name, f"must have one entry per text ({len(texts)})")
        items = [
            {
                "text": text,
                "metadata": metadatas[i] if metadatas else None,
                "id": ids[i] if ids else None,
            }
            for i, text in enumerate(texts)
        ]
        size = self._pair.local("MemlayerVectorStore").limits.max_batch
        return [items[start : start + size] for start in range(0, len(items), size)]

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete these ids from the scope; ids it does not hold are not an error."""
        self._pair.sync.delete_many(_ids_to_delete(ids, kwargs), **self.scope)
        return True

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """See `delete`."""
        await self._pair.aio.delete_many(_ids_to_delete(ids, kwargs), **self.scope)
        return True

    # -- reads ----------------------------------------------------------------------------

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The documents with these ids in the scope, in the order asked; missing ones left out."""
        return [plain_document(hit) for hit in self._pair.sync.get_many(ids, **self.scope)]

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """See `get_by_ids`."""
        hits = await self._pair.aio.get_many(ids, **self.scope)
        return [plain_document(hit) for hit in hits]

    def similarity_search(
        self, query: str, k: int = 4, filter: Filter = None, **kwargs: Any
    ) -> list[Document]:
        """The k documents nearest to the query."""
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter, **kwargs)]

    async def asimilarity_search(
        self, query: str, k: int = 4, filter: Filter = None, **kwargs: Any
    ) -> list[Document]:
        """See `similarity_search`."""
        scored = await self.asimilarity_search_with_score(query, k, filter, **kwargs)
        return [doc for doc, _ in scored]

    def similarity_search_with_score(
        self, query: str, k: int = 4, filter: Filter = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """The k nearest documents with their cosine similarity."""
        vector = self.embeddings.embed_query(query)
        return self._scored(self._search(vector, k, filter, kwargs))

    async def asimilarity_search_with_score(
        self, query: str, k: int = 4, filter: Filter = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """See `similarity_search_with_score`."""
        vector = await self.embeddings.aembed_query(query)
        return self._scored(await self._asearch(vector, k, filter, kwargs))

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, filter: Filter = None, **kwargs: Any
    ) -> list[Document]:
        """The k documents nearest to a query vector."""
        return [doc for doc, _ in self._scored(self._search(embedding, k, filter, kwargs))]

    async def asimilarity_search_by_vector(
        self, embedding: list[float], k: int = 4, filter: Filter = None, **kwargs: Any
    ) -> list[Document]:
        """See `similarity_search_by_vector`."""
        hits = await self._asearch(embedding, k, filter, kwargs)
        return [doc for doc, _ in self._scored(hits)]

    def max_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: Filter = None,
        **kwargs: Any,
    ) -> list[Document]:
        """k documents that are near the query and far from each other, picked from the
        fetch_k nearest (their vectors are re-embedded from their text)."""
        vector = self.embeddings.embed_query(query)
        return self.max_marginal_relevance_search_by_vector(
            vector, k, fetch_k, lambda_mult, filter, **kwargs
        )

    async def amax_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: Filter = None,
        **kwargs: Any,
    ) -> list[Document]:
        """See `max_marginal_relevance_search`."""
        vector = await self.embeddings.aembed_query(query)
        return await self.amax_marginal_relevance_search_by_vector(
            vector, k, fetch_k, lambda_mult, filter, **kwargs
        )

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: Filter = None,
        **kwargs: Any,
    ) -> list[Document]:
        """See `max_marginal_relevance_search`, from a query vector."""
        hits = self._search(embedding, max(fetch_k, k), filter, kwargs)
        vectors = self.embeddings.embed_documents([hit.text for hit in hits]) if hits else []
        return _mmr(embedding, hits, vectors, k, lambda_mult)

    async def amax_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: Filter = None,
        **kwargs: Any,
    ) -> list[Document]:
        """See `max_marginal_relevance_search_by_vector`."""
        hits = await self._asearch(embedding, max(fetch_k, k), filter, kwargs)
        texts = [hit.text for hit in hits]
        vectors = await self.embeddings.aembed_documents(texts) if hits else []
        return _mmr(embedding, hits, vectors, k, lambda_mult)

    def _search(self, vector: Any, k: int, filter: Filter, extra: dict[str, Any]) -> list[Any]:
        _no_extra(extra)
        return self._pair.sync.search_by_vector(vector, k=k, filters=filter, **self.scope)

    async def _asearch(
        self, vector: Any, k: int, filter: Filter, extra: dict[str, Any]
    ) -> list[Any]:
        _no_extra(extra)
        return await self._pair.aio.search_by_vector(vector, k=k, filters=filter, **self.scope)

    @staticmethod
    def _scored(hits: list[Any]) -> list[tuple[Document, float]]:
        return [(plain_document(hit), hit.score) for hit in hits]

    def _select_relevance_score_fn(self) -> Any:
        return lambda cosine: (1.0 + cosine) / 2.0

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> MemlayerVectorStore:
        """A store opened at `path` / `url` (keyword arguments) holding these texts."""
        store = cls(embedding=embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store


def _ids_to_delete(ids: list[str] | None, extra: dict[str, Any]) -> list[str]:
    _no_extra(extra)
    if ids is None:
        raise InvalidInputError(
            "ids", "name the ids to delete (Memory.delete_scope deletes a whole scope)"
        )
    return ids


def _no_extra(extra: dict[str, Any]) -> None:
    if extra:
        raise InvalidInputError(sorted(extra)[0], "is not an option of this vector store call")


def _mmr(
    query: list[float], hits: list[Any], vectors: list[list[float]], k: int, lambda_mult: float
) -> list[Document]:
    if not hits:
        return []
    picked = maximal_marginal_relevance(
        np.asarray(query, dtype=np.float32), vectors, lambda_mult=lambda_mult, k=k
    )
    return [plain_document(hits[i]) for i in picked]
