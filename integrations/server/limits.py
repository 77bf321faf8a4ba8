"""Request limits: body size (413), a token bucket per API key (429) and a time limit per
request's work (503).

The rate limit is kept per process: with N workers, or N hosts, a key may make up to N times
the configured rate. (A shared limit needs a shared counter, such as Redis; the workers'
database is not worth a write per request for it.)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from memlayer.integrations.server.errors import ApiError, error_response

T = TypeVar("T")


class BodyLimit:
    """ASGI middleware: refuse a request body over `max_bytes` (declared or streamed) with 413
    before anything reads it whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # FastAPI passes an HTTPException from reading the body through unchanged
                raise HTTPException(413, self._rule())
            return message

        await self.app(scope, counted, send)

    def _rule(self) -> str:
        return f"body: must be at most {self.max_bytes} bytes"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, "too_large", self._rule(), "body")
        await response(scope, receive, send)


class RateLimiter:
    """A token bucket per API key: `rate` requests a second on average, `burst` at once.

    Buckets of keys idle long enough to be full again are dropped, so memory stays bounded
    by the keys active in the last `burst / rate` seconds (and at most `max_keys`).
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> None:
        """Spend one token of `key`'s bucket, or raise a 429 saying when to retry."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        tokens, then = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            wait = math.ceil((1.0 - tokens) / self.rate)
            raise ApiError(
                429,
                "rate_limited",
                f"this key's limit is {self.rate:g} requests/s (burst {self.burst}); "
                f"retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        self._buckets[key] = (tokens - 1.0, now)
        self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        refill_s = self.burst / self.rate
        while self._buckets:
            key, (_, then) = next(iter(self._buckets.items()))
            if now - then < refill_s and len(self._buckets) <= self.max_keys:
                break
            del self._buckets[key]


async def within(seconds: float, work: Awaitable[T]) -> T:
    """Await `work` for at most `seconds`, else answer 503 (the work may still complete; it
    was not acknowledged)."""
    try:
        return await asyncio.wait_for(work, timeout=seconds)
    except asyncio.TimeoutError as exc:
        raise ApiError(
            503, "timeout", f"the request took longer than {seconds:g} s; retry it"
        ) from exc


def rule_of(settings: Any) -> str:
    """How the limits read in the API description."""
    return (
        f"bodies up to {settings.max_body_bytes} bytes; {settings.rate_per_s:g} requests/s per "
        f"key and process (burst {settings.rate_burst}); {settings.timeout_s:g} s per request; "
        f"pages of at most {settings.max_page} items"
    )
