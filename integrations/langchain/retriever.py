"""`MemlayerRetriever`: memlayer's search as a LangChain retriever, sync and async."""

from __future__ import annotations

from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, PrivateAttr

from memlayer import InvalidInputError
from memlayer.integrations.langchain.documents import (
    SCOPE_FIELDS,
    MemoryPair,
    detailed_document,
    scope_of,
)

Mode = Literal["hybrid", "vector", "keyword"]
_OVERRIDABLE = ("k", "filters", "mode", "context_budget_tokens", "strategy", *SCOPE_FIELDS)


class MemlayerRetriever(BaseRetriever):
    """Recall from a `Memory` (or `AsyncMemory`) in any chain.

    Every field set here can be overridden per call: `retriever.invoke(q, k=2,
    filters={"kind": "pref"}, user_id="ada")`. Documents carry the record's metadata plus
    `score`, `id`, `created_at` and its scope fields. With `context_budget_tokens`, the
    retriever returns one document: the packed context of `Memory.context` (its `strategy`),
    with the ids it quotes in `metadata["ids"]`.

    >>> from memlayer import Memory
    >>> memory = Memory(path="./agent-memory", embedder="hash")
    >>> retriever = MemlayerRetriever(memory=memory, k=2, user_id="ada")
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    memory: Any = Field(description="a memlayer Memory or AsyncMemory")
    k: int = 4
    filters: dict[str, Any] | None = None
    mode: Mode = "hybrid"
    context_budget_tokens: int | None = None
    strategy: str = "ranked"
    tenant_id: str | None = None
    user_id: str | None = None
    agent_id: str | None = None
    session_id: str | None = None

    _pair: MemoryPair = PrivateAttr()

    def __init__(self, **data: Any):
        pair = MemoryPair.of(data.get("memory"))  # memlayer's own error, not pydantic's
        super().__init__(**data)
        self._pair = pair

    def _settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(overrides) - set(_OVERRIDABLE))
        if unknown:
            raise InvalidInputError(
                unknown[0], f"is not a retriever option (one of {', '.join(_OVERRIDABLE)})"
            )
        return {name: overrides.get(name, getattr(self, name)) for name in _OVERRIDABLE}

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        s = self._settings(kwargs)
        memory = self._pair.sync
        if s["context_budget_tokens"] is not None:
            return [_context_document(memory.context(query, **_context_args(s)), s)]
        hits = memory.search(query, k=s["k"], filters=s["filters"], mode=s["mode"], **scope_of(s))
        return [detailed_document(hit) for hit in hits]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        s = self._settings(kwargs)
        memory = self._pair.aio
        if s["context_budget_tokens"] is not None:
            return [_context_document(await memory.context(query, **_context_args(s)), s)]
        hits = await memory.search(
            query, k=s["k"], filters=s["filters"], mode=s["mode"], **scope_of(s)
        )
        return [detailed_document(hit) for hit in hits]


def _context_args(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "budget_tokens": s["context_budget_tokens"],
        "strategy": s["strategy"],
        "filters": s["filters"],
        **scope_of(s),
    }


def _context_document(context: Any, s: dict[str, Any]) -> Document:
    metadata = {"ids": list(context.ids), "tokens": context.tokens, "strategy": s["strategy"]}
    return Document(page_content=context.text, metadata=metadata)
