"""Embedders both ways: a LangChain `Embeddings` as a memlayer embedder, and a memlayer
embedder as LangChain `Embeddings`, so either side can embed for the other."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
from langchain_core.embeddings import Embeddings

from memlayer import InvalidInputError


class LangChainEmbedder:
    """A memlayer embedder over LangChain `Embeddings`: documents through `embed_documents`,
    unit-normalised, named after the class (and model) so a store refuses a different one."""

    def __init__(self, embeddings: Embeddings):
        if not isinstance(embeddings, Embeddings):
            raise InvalidInputError(
                "embedding", "must be a langchain_core Embeddings", type(embeddings).__name__
            )
        self.embeddings = embeddings
        kind = type(embeddings)
        model = next(
            (
                str(value)
                for attr in ("model", "model_name", "size")
                if (value := getattr(embeddings, attr, None)) is not None
            ),
            "",
        )
        self.name = f"langchain:{kind.__module__}.{kind.__qualname__}" + (
            f":{model}" if model else ""
        )
        self.dim = len(embeddings.embed_query("dimension probe"))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Document vectors, each scaled to unit length (memlayer ranks by inner product)."""
        vectors = np.asarray(self.embeddings.embed_documents(list(texts)), dtype=np.float32)
        if vectors.ndim != 2 or not np.isfinite(vectors).all():
            return vectors  # Memory refuses it, naming the rule
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


class MemlayerEmbeddings(Embeddings):
    """LangChain `Embeddings` over a memlayer embedder (a `Memory`'s `embedder`, MiniLM by
    default): what `MemlayerVectorStore.embeddings` returns when no LangChain one was given."""

    def __init__(self, embedder: Any):
        self.embedder = embedder

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One vector per text."""
        if not texts:
            return []
        return np.asarray(self.embedder.embed(texts), dtype=np.float32).tolist()

    def embed_query(self, text: str) -> list[float]:
        """The query's vector (memlayer's embedders embed queries and documents alike)."""
        return self.embed_documents([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """`embed_documents` off the event loop (the model runs on this process's CPU)."""
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """`embed_query` off the event loop."""
        return await asyncio.to_thread(self.embed_query, text)
