"""Who is calling: the admin (a token from the environment) or a tenant's API key.

The tenant of a data request comes from its key and from nothing else: no route takes a
tenant in its path, query or body.

A process trusts a key it found in the database for `key_cache_s` seconds (`KeyCache`), so
a request needs no database read and no thread for its key. A revocation takes effect at
once in the process that made it and within `key_cache_s` in every other process.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from memlayer.integrations.server.errors import ApiError
from memlayer.integrations.server.tenants import Caller, hash_key

bearer = HTTPBearer(auto_error=False, description="an API key, or the admin token")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, "Authorization", _CHALLENGE)


class KeyCache:
    """Valid keys (by hash) this process looked up in the last `ttl_s` seconds, at most
    `max_keys` of them. Only found keys are kept, so unknown keys cannot fill it.

    Used from the event loop only. `forget` (after a revocation here) drops the key at once
    and makes a lookup that was already under way not store what it read before.
    """

    def __init__(self, ttl_s: float, max_keys: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self.generation = 0
        self._found: OrderedDict[str, tuple[Caller, float]] = OrderedDict()

    def get(self, digest: str) -> Caller | None:
        """The caller of a key hash looked up less than `ttl_s` ago, else None."""
        entry = self._found.get(digest)
        if entry is None:
            return None
        if time.monotonic() - entry[1] >= self.ttl_s:
            del self._found[digest]
            return None
        return entry[0]

    def put(self, digest: str, found: Caller, looked_up: float, generation: int) -> None:
        """Remember a lookup that began at `looked_up` under `generation`."""
        if self.ttl_s <= 0 or generation != self.generation:
            return
        self._found[digest] = (found, looked_up)
        self._found.move_to_end(digest)
        while len(self._found) > self.max_keys:
            self._found.popitem(last=False)

    def forget(self, key_id: str) -> None:
        """Drop a key (it was revoked here) and void the lookups under way."""
        self.generation += 1
        for digest in [d for d, (c, _) in self._found.items() if c.key_id == key_id]:
            del self._found[digest]


async def caller(request: Request, credentials: Credentials) -> Caller:
    """The tenant and key of a data request; 401 without a valid, unrevoked key, 429 when the
    key is over its rate."""
    if credentials is None:
        raise _unauthorized("send an API key: 'Authorization: Bearer <key>'")
    service = request.app.state.service
    digest = hash_key(credentials.credentials)
    found = service.keys.get(digest)
    if found is None:
        generation, looked_up = service.keys.generation, time.monotonic()
        found = await service.call(service.tenants.caller_by_hash, digest)
        if found is None:
            raise _unauthorized("the API key is unknown or revoked")
        service.keys.put(digest, found, looked_up, generation)
    service.limiter.take(found.key_id)
    return found


async def admin(request: Request, credentials: Credentials) -> None:
    """Let only the holder of `MEMLAYER_ADMIN_TOKEN` through (403 when none is configured)."""
    expected = request.app.state.service.settings.admin_token
    if not expected:
        raise ApiError(403, "forbidden", "the admin API is off: set MEMLAYER_ADMIN_TOKEN")
    if credentials is None:
        raise _unauthorized("send the admin token: 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise _unauthorized("the admin token is wrong")


Tenant = Annotated[Caller, Depends(caller)]
Admin = Depends(admin)
