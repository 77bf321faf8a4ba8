"""`AsyncMemory`: the `Memory` API for asyncio code, each call run in a worker thread.

Embedding and SQL are blocking; running them off the event loop keeps an agent's loop
responsive. Calls are serialized by Memory's own lock, so concurrent awaits are safe.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from memlayer.errors import InvalidInputError
from memlayer.memory import Memory

T = TypeVar("T")


class AsyncMemory:
    """Awaitable twin of `Memory`: same constructor, same methods, awaited."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._memory = Memory(*args, **kwargs)

    @classmethod
    def wrap(cls, memory: Memory) -> AsyncMemory:
        """An AsyncMemory over an open `Memory`: both see and write the same records, and
        closing either closes both."""
        if not isinstance(memory, Memory):
            raise InvalidInputError("memory", "must be a memlayer.Memory", type(memory).__name__)
        wrapper = cls.__new__(cls)
        wrapper._memory = memory
        return wrapper

    @property
    def sync(self) -> Memory:
        """The underlying synchronous Memory."""
        return self._memory

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))

    async def add(self, text: str, **kwargs: Any) -> str:
        """See `Memory.add`."""
        return await self._run(self._memory.add, text, **kwargs)

    async def add_many(self, items: Any, **scope: Any) -> list[str]:
        """See `Memory.add_many`."""
        return await self._run(self._memory.add_many, list(items), **scope)

    async def bulk_add(self, items: Any, **kwargs: Any) -> list[str]:
        """See `Memory.bulk_add`."""
        return await self._run(self._memory.bulk_add, list(items), **kwargs)

    @asynccontextmanager
    async def bulk_loading(self) -> AsyncIterator[None]:
        """See `Memory.bulk_loading` (entered and left in a worker thread: on PostgreSQL
        the index is dropped and rebuilt off the event loop)."""
        manager = self._memory.bulk_loading()
        await self._run(manager.__enter__)
        try:
            yield
        except BaseException as exc:
            if not await self._run(manager.__exit__, type(exc), exc, exc.__traceback__):
                raise
        else:
            await self._run(manager.__exit__, None, None, None)

    async def ingest(self, stream: Any, **kwargs: Any) -> int:
        """See `Memory.ingest`."""
        return await self._run(self._memory.ingest, stream, **kwargs)

    async def search(self, query: str, **kwargs: Any) -> list[Any]:
        """See `Memory.search`."""
        return await self._run(self._memory.search, query, **kwargs)

    async def get(self, id: str, **scope: Any) -> Any:
        """See `Memory.get`."""
        return await self._run(self._memory.get, id, **scope)

    async def update(
        self, id: str, text: str | None = None, metadata: Any = None, **scope: Any
    ) -> None:
        """See `Memory.update`."""
        await self._run(self._memory.update, id, text, metadata, **scope)

    async def delete(self, id: str, **scope: Any) -> None:
        """See `Memory.delete`."""
        await self._run(self._memory.delete, id, **scope)

    async def delete_many(self, ids: Any, **scope: Any) -> int:
        """See `Memory.delete_many`."""
        return await self._run(self._memory.delete_many, ids, **scope)

    async def delete_scope(self, **scope: Any) -> int:
        """See `Memory.delete_scope`."""
        return await self._run(self._memory.delete_scope, **scope)

    async def get_many(self, ids: Any, **scope: Any) -> list[Any]:
        """See `Memory.get_many`."""
        return await self._run(self._memory.get_many, ids, **scope)

    async def scan(self, **kwargs: Any) -> list[Any]:
        """See `Memory.scan`."""
        return await self._run(self._memory.scan, **kwargs)

    async def search_by_vector(self, vector: Any, **kwargs: Any) -> list[Any]:
        """See `Memory.search_by_vector`."""
        return await self._run(self._memory.search_by_vector, vector, **kwargs)

    async def count(self, **kwargs: Any) -> int:
        """See `Memory.count`."""
        return await self._run(self._memory.count, **kwargs)

    async def context(self, query: str, **kwargs: Any) -> Any:
        """See `Memory.context`."""
        return await self._run(self._memory.context, query, **kwargs)

    async def stats(self) -> dict[str, Any]:
        """See `Memory.stats`."""
        return await self._run(self._memory.stats)

    async def close(self) -> None:
        """See `Memory.close`."""
        await self._run(self._memory.close)

    async def __aenter__(self) -> AsyncMemory:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
