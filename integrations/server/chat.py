"""Users, their chat sessions and messages; export and forget a user.

Each message is a memory in the scope (tenant, user, session), so search and context recall
old turns. Its metadata holds the caller's own keys plus `kind: "message"` and `role` (those
two names are the service's). A user exists once they have a session; appending to a session
that does not exist yet opens it.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Path, Query

from memlayer import Hit, NotFoundError
from memlayer.integrations.server.auth import Tenant
from memlayer.integrations.server.schemas import (
    DeletedOut,
    ExportOut,
    IdsOut,
    MessageOut,
    MessagesIn,
    MessagesOut,
    SessionIn,
    SessionOut,
    SessionsOut,
    UsersOut,
)
from memlayer.integrations.server.service import Svc, memory_out, page_of

router = APIRouter(prefix="/v1", tags=["users"])
UserPath = Annotated[str, Path(min_length=1, max_length=256)]
SessionPath = Annotated[str, Path(min_length=1, max_length=256)]
Offset = Annotated[int, Query(ge=0, le=10_000_000)]
Limit = Annotated[int, Query(ge=1, le=1000)]
_MESSAGES = {"kind": "message"}


@router.get("/users", response_model=UsersOut)
async def list_users(caller: Tenant, svc: Svc, offset: Offset = 0, limit: Limit = 100) -> UsersOut:
    """The tenant's users that have sessions, in id order."""
    users = await svc.call(svc.tenants.list_users, caller.tenant_id, offset, limit + 1)
    window, next_offset = page_of(users, offset, limit)
    return UsersOut(users=window, next_offset=next_offset)


@router.get("/users/{user_id}/export", response_model=ExportOut)
async def export_user(
    user_id: UserPath, caller: Tenant, svc: Svc, offset: Offset = 0, limit: Limit = 1000
) -> ExportOut:
    """Everything the service holds about a user: their sessions and, a page at a time, every
    memory in their scope (messages included), oldest first."""
    sessions = await svc.call(svc.tenants.list_sessions, caller.tenant_id, user_id, 0, 10**9)
    hits = await svc.call(
        svc.memory.scan, offset=offset, limit=limit + 1, tenant_id=caller.tenant_id, user_id=user_id
    )
    window, next_offset = page_of(hits, offset, limit)
    return ExportOut(
        user_id=user_id,
        sessions=[SessionOut(**row) for row in sessions],
        memories=[memory_out(hit) for hit in window],
        next_offset=next_offset,
    )


@router.delete("/users/{user_id}", response_model=DeletedOut)
async def forget_user(user_id: UserPath, caller: Tenant, svc: Svc) -> DeletedOut:
    """Forget a user completely: every memory in their scope and every session."""
    await svc.call(svc.tenants.delete_sessions, caller.tenant_id, user_id)
    deleted = await svc.call(svc.memory.delete_scope, tenant_id=caller.tenant_id, user_id=user_id)
    return DeletedOut(deleted=deleted)


@router.post("/users/{user_id}/sessions", status_code=201, response_model=SessionOut)
async def open_session(user_id: UserPath, body: SessionIn, caller: Tenant, svc: Svc) -> SessionOut:
    """Open a session of the user (an existing id is returned as it is)."""
    session_id = body.session_id or secrets.token_hex(8)
    row = await svc.call(svc.tenants.open_session, caller.tenant_id, user_id, session_id)
    return SessionOut(**row)


@router.get("/users/{user_id}/sessions", response_model=SessionsOut)
async def list_sessions(
    user_id: UserPath, caller: Tenant, svc: Svc, offset: Offset = 0, limit: Limit = 100
) -> SessionsOut:
    """The user's sessions, oldest first."""
    rows = await svc.call(svc.tenants.list_sessions, caller.tenant_id, user_id, offset, limit + 1)
    window, next_offset = page_of(rows, offset, limit)
    return SessionsOut(sessions=[SessionOut(**row) for row in window], next_offset=next_offset)


@router.get("/users/{user_id}/sessions/{session_id}", response_model=SessionOut)
async def get_session(
    user_id: UserPath, session_id: SessionPath, caller: Tenant, svc: Svc
) -> SessionOut:
    """One session of the user; 404 when there is none."""
    row = await svc.call(svc.tenants.session, caller.tenant_id, user_id, session_id)
    if row is None:
        raise NotFoundError("session", session_id)
    return SessionOut(**row)


@router.delete("/users/{user_id}/sessions/{session_id}", response_model=DeletedOut)
async def delete_session(
    user_id: UserPath, session_id: SessionPath, caller: Tenant, svc: Svc
) -> DeletedOut:
    """Forget one session: its messages and every other memory in its scope."""
    if not await svc.call(svc.tenants.delete_sessions, caller.tenant_id, user_id, session_id):
        raise NotFoundError("session", session_id)
    deleted = await svc.call(
        svc.memory.delete_scope,
        tenant_id=caller.tenant_id,
        user_id=user_id,
        session_id=session_id,
    )
    return DeletedOut(deleted=deleted)


@router.post(
    "/users/{user_id}/sessions/{session_id}/messages", status_code=201, response_model=IdsOut
)
async def append_messages(
    user_id: UserPath, session_id: SessionPath, body: MessagesIn, caller: Tenant, svc: Svc
) -> IdsOut:
    """Append chat turns to the session, in order, in one transaction; each is indexed as a
    memory. Committed when answered."""
    items = [
        {"text": m.content, "metadata": {**(m.metadata or {}), **_MESSAGES, "role": m.role}}
        for m in body.messages
    ]
    scope = {"tenant_id": caller.tenant_id, "user_id": user_id, "session_id": session_id}
    if body.agent_id is not None:
        scope["agent_id"] = body.agent_id

    def append() -> list[str]:  # one thread hop for both
        svc.tenants.open_session(caller.tenant_id, user_id, session_id)
        return svc.memory.add_many(items, **scope)

    return IdsOut(ids=await svc.call(append))


@router.get("/users/{user_id}/sessions/{session_id}/messages", response_model=MessagesOut)
async def list_messages(
    user_id: UserPath,
    session_id: SessionPath,
    caller: Tenant,
    svc: Svc,
    offset: Offset = 0,
    limit: Limit = 100,
) -> MessagesOut:
    """The session's messages in the order they were appended, a page at a time."""
    if await svc.call(svc.tenants.session, caller.tenant_id, user_id, session_id) is None:
        raise NotFoundError("session", session_id)
    hits = await svc.call(
        svc.memory.scan,
        filters=_MESSAGES,
        offset=offset,
        limit=limit + 1,
        tenant_id=caller.tenant_id,
        user_id=user_id,
        session_id=session_id,
    )
    window, next_offset = page_of(hits, offset, limit)
    return MessagesOut(messages=[_message(hit) for hit in window], next_offset=next_offset)


def _message(hit: Hit) -> MessageOut:
    metadata = {k: v for k, v in hit.metadata.items() if k not in ("kind", "role")}
    return MessageOut(
        id=hit.id,
        role=str(hit.metadata.get("role", "")),
        content=hit.text,
        metadata=metadata,
        agent_id=hit.scope.agent_id,
        created_at=hit.created_at,
    )
