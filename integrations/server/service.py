"""What every route works with: the open `Memory`, the tenant store, the settings and limits,
the key cache, and `call`, which runs blocking work off the event loop under the request time
limit.

Each route makes one `call` per request where it can (the key comes from the cache): every
hop to a thread and back queues behind the other requests' hops and hands the GIL over
twice, which under load costs far more than the work itself.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from memlayer import Hit, Memory
from memlayer.integrations.server.auth import KeyCache
from memlayer.integrations.server.config import ServerSettings
from memlayer.integrations.server.limits import RateLimiter, within
from memlayer.integrations.server.schemas import MemoryOut
from memlayer.integrations.server.tenants import TenantStore

T = TypeVar("T")


@dataclass
class Service:
    """One process's share of the service (it holds no state two workers could disagree on:
    records, tenants, keys and sessions are all in the database)."""

    memory: Memory
    tenants: TenantStore
    settings: ServerSettings
    limiter: RateLimiter
    keys: KeyCache = field(init=False)
    executor: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.keys = KeyCache(self.settings.key_cache_s)
        self.executor = ThreadPoolExecutor(self.settings.threads, thread_name_prefix="memlayer")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in one of `settings.threads` threads, for at most
        `settings.timeout_s`."""
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))
        return await within(self.settings.timeout_s, work)

    def close(self) -> None:
        """Let the threads finish what they run, then end them."""
        self.executor.shutdown(wait=True)


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


Svc = Annotated[Service, Depends(_service)]


def memory_out(hit: Hit) -> MemoryOut:
    """A stored memory (or a search hit) as the API shows it."""
    return MemoryOut(
        id=hit.id,
        text=hit.text,
        score=hit.score,
        metadata=hit.metadata,
        created_at=hit.created_at,
        updated_at=hit.updated_at,
        **hit.scope.as_dict(),
    )


def page_of(items: list[T], offset: int, limit: int) -> tuple[list[T], int | None]:
    """A page from `limit + 1` items fetched at `offset`, and the next page's offset (None
    when this is the last)."""
    return items[:limit], (offset + limit if len(items) > limit else None)
