"""Memory hits as LangChain documents, and the Memory / AsyncMemory pair each class holds."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from langchain_core.documents import Document

from memlayer import (
    AsyncMemory,
    AsyncRemoteMemory,
    Hit,
    InvalidInputError,
    Memory,
    RemoteMemory,
    Scope,
)

SCOPE_FIELDS = tuple(field.name for field in fields(Scope))


def plain_document(hit: Hit) -> Document:
    """The record as stored: its text, its own metadata and its id (what a vector store
    hands back, so a document round-trips unchanged)."""
    return Document(page_content=hit.text, metadata=dict(hit.metadata), id=hit.id)


def detailed_document(hit: Hit) -> Document:
    """The record with where it came from: score, id, created_at and the scope fields it
    lives in, set over the record's own metadata keys of the same names."""
    details: dict[str, Any] = {"score": hit.score, "id": hit.id, "created_at": hit.created_at}
    details.update({k: v for k, v in hit.scope.as_dict().items() if v is not None})
    return Document(page_content=hit.text, metadata={**hit.metadata, **details}, id=hit.id)


@dataclass(frozen=True)
class MemoryPair:
    """One memory seen both ways: sync calls go to `sync`, awaited ones to `aio` (the same
    records: one lock in process, or one service)."""

    sync: Memory | RemoteMemory
    aio: AsyncMemory | AsyncRemoteMemory

    @classmethod
    def of(cls, memory: object, field: str = "memory") -> MemoryPair:
        """Accept a `Memory`, an `AsyncMemory`, or a `RemoteMemory` / `AsyncRemoteMemory` of
        the memory service; anything else is refused naming `field`."""
        if isinstance(memory, (AsyncMemory, AsyncRemoteMemory)):
            return cls(memory.sync, memory)
        if isinstance(memory, Memory):
            return cls(memory, AsyncMemory.wrap(memory))
        if isinstance(memory, RemoteMemory):
            return cls(memory, memory.asynchronous())
        raise InvalidInputError(
            field,
            "must be a memlayer Memory, AsyncMemory, RemoteMemory or AsyncRemoteMemory",
            type(memory).__name__,
        )

    def local(self, feature: str) -> Memory:
        """The in-process Memory, for features the service does not offer (`feature`)."""
        if not isinstance(self.sync, Memory):
            raise InvalidInputError("memory", f"{feature} needs an in-process memlayer Memory")
        return self.sync


def scope_of(values: dict[str, Any]) -> dict[str, str | None]:
    """The scope fields named in `values` (None values dropped)."""
    return {k: values[k] for k in SCOPE_FIELDS if values.get(k) is not None}
