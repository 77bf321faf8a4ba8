"""LangChain's own conformance suites (`langchain-tests`) on memlayer's retriever and vector
store, over a real SQLite file and FAISS index."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import BACKENDS, location

pytest.importorskip("langchain_tests", reason="needs the test extra (langchain-tests)")

from langchain_core.vectorstores import VectorStore
from langchain_tests.integration_tests import (
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)

from memlayer import Memory
from memlayer.integrations.langchain import (
    MemlayerRetriever,
    MemlayerVectorStore,
)


class TestMemlayerVectorStoreStandard(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self, tmp_path: Path) -> Iterator[VectorStore]:  # type: ignore[override]
        store = MemlayerVectorStore(embedding=self.get_embeddings(), path=tmp_path)
        try:
            yield store
        finally:
            store.close()


class TestMemlayerVectorStoreOnAGivenMemoryStandard(VectorStoreIntegrationTests):
    """The same suite through a Memory the caller opened (a hashing embedder of its own) and a
    user scope inside it, next to another user's records the store must never see."""

    @pytest.fixture
    def vectorstore(self, tmp_path: Path) -> Iterator[VectorStore]:  # type: ignore[override]
        with Memory(path=tmp_path, embedder="hash-256") as memory:
            memory.add_many(["foo", "bar", "baz"], user_id="someone-else")
            yield MemlayerVectorStore(memory, user_id="ada")


@pytest.mark.postgres
class TestMemlayerVectorStoreOnPostgresStandard(VectorStoreIntegrationTests):
    """The same suite on a real PostgreSQL with pgvector (a fresh database per test)."""

    @pytest.fixture
    def vectorstore(self, postgres_url: str) -> Iterator[VectorStore]:  # type: ignore[override]
        store = MemlayerVectorStore(embedding=self.get_embeddings(), url=postgres_url)
        try:
            yield store
        finally:
            store.close()


@pytest.fixture(scope="module", params=BACKENDS)
def filled_memory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Memory]:
    where = location(request.param, request, tmp_path_factory.mktemp("retriever"))
    with Memory(**where, embedder="hash") as memory:
        memory.add_many([f"note {i} about the garden and the weather" for i in range(8)])
        yield memory


class TestMemlayerRetrieverStandard(RetrieversIntegrationTests):
    @pytest.fixture(autouse=True)
    def _memory(self, filled_memory: Memory) -> None:
        self.memory = filled_memory

    @property
    def retriever_constructor(self) -> type[MemlayerRetriever]:
        return MemlayerRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"memory": self.memory}

    @property
    def retriever_query_example(self) -> str:
        return "what about the garden?"
