"""memlayer for LangChain and LangGraph (extra `langchain`): a retriever, a vector store, chat
history and a LangGraph long-term store, all over the public `Memory` API.

Each class loads on first use, so the retriever does not need LangGraph installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "MemlayerRetriever": "memlayer.integrations.langchain.retriever",
    "MemlayerVectorStore": "memlayer.integrations.langchain.vectorstore",
    "MemlayerChatMessageHistory": "memlayer.integrations.langchain.chat_history",
    "MemlayerStore": "memlayer.integrations.langchain.store",
    "MemlayerEmbeddings": "memlayer.integrations.langchain.embeddings",
}

if TYPE_CHECKING:
    from memlayer.integrations.langchain.chat_history import MemlayerChatMessageHistory
    from memlayer.integrations.langchain.embeddings import MemlayerEmbeddings
    from memlayer.integrations.langchain.retriever import MemlayerRetriever
    from memlayer.integrations.langchain.store import MemlayerStore
    from memlayer.integrations.langchain.vectorstore import MemlayerVectorStore


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "MemlayerChatMessageHistory",
    "MemlayerEmbeddings",
    "MemlayerRetriever",
    "MemlayerStore",
    "MemlayerVectorStore",
]
