"""Who is calling: the admin (a token from the environment) or a tenant's API key.

The tenant of a data request comes from its key and from nothing else: no route takes a
tenant in its path, query or body.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from memlayer.integrations.server.errors import ApiError
from memlayer.integrations.server.tenants import Caller

bearer = HTTPBearer(auto_error=False, description="an API key, or the admin token")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, "Authorization", _CHALLENGE)


async def caller(request: Request, credentials: Credentials) -> Caller:
    """The tenant and key of a data request; 401 without a valid, unrevoked key, 429 when the
    key is over its rate."""
    if credentials is None:
        raise _unauthorized("send an API key: 'Authorization: Bearer <key>'")
    service = request.app.state.service
    found = await service.call(service.tenants.caller, credentials.credentials)
    if found is None:
        raise _unauthorized("the API key is unknown or revoked")
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
