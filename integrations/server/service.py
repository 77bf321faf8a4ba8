"""What every route works with: the open `Memory`, the tenant store, the settings and limits,
and `call`, which runs blocking work off the event loop under the request time limit."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from memlayer import Hit, Memory
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

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in a worker thread, for at most `settings.timeout_s`."""
        work = asyncio.to_thread(functools.partial(fn, *args, **kwargs))
        return await within(self.settings.timeout_s, work)


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
