"""Memories of the caller's tenant: add, list, get, update, delete; search and context."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Response

from memlayer import InvalidInputError, NotFoundError
from memlayer.integrations.server.auth import Tenant
from memlayer.integrations.server.schemas import (
    BulkIn,
    ContextIn,
    ContextOut,
    CountIn,
    CountOut,
    DeletedOut,
    HitsOut,
    IdOut,
    IdsIn,
    IdsOut,
    MemoriesOut,
    MemoryIn,
    MemoryOut,
    PartOut,
    PatchIn,
    ScanIn,
    SearchIn,
    VectorSearchIn,
    WhoAmIOut,
)
from memlayer.integrations.server.service import Svc, memory_out, page_of

router = APIRouter(prefix="/v1")
RecordPath = Annotated[str, Path(min_length=1, max_length=128)]
ScopeParam = Annotated[str | None, Query(min_length=1, max_length=256)]


def scope_query(
    user_id: ScopeParam = None, agent_id: ScopeParam = None, session_id: ScopeParam = None
) -> dict[str, str]:
    """The scope named in the query string (inside the caller's tenant)."""
    scope = {"user_id": user_id, "agent_id": agent_id, "session_id": session_id}
    return {k: v for k, v in scope.items() if v is not None}


QueryScope = Annotated[dict[str, str], Depends(scope_query)]


@router.get("/me", tags=["keys"], response_model=WhoAmIOut)
async def whoami(caller: Tenant, svc: Svc) -> WhoAmIOut:
    """The tenant and key of this request, and how many memories the tenant holds."""
    records = await svc.call(svc.memory.count, tenant_id=caller.tenant_id)
    return WhoAmIOut(tenant_id=caller.tenant_id, key_id=caller.key_id, records=records)


@router.post("/memories", tags=["memories"], status_code=201, response_model=IdOut)
async def add_memory(body: MemoryIn, caller: Tenant, svc: Svc) -> IdOut:
    """Store one memory; an `id` the tenant already has is replaced. Committed when answered."""
    rid = await svc.call(
        svc.memory.add,
        body.text,
        metadata=body.metadata,
        id=body.id,
        tenant_id=caller.tenant_id,
        **body.scope(),
    )
    return IdOut(id=rid)


@router.post("/memories/bulk", tags=["memories"], status_code=201, response_model=IdsOut)
async def add_memories(body: BulkIn, caller: Tenant, svc: Svc) -> IdsOut:
    """Store many memories in one transaction (one embedding batch)."""
    items = [item.model_dump() for item in body.items]
    ids = await svc.call(svc.memory.add_many, items, tenant_id=caller.tenant_id, **body.scope())
    return IdsOut(ids=ids)


@router.get("/memories", tags=["memories"], response_model=MemoriesOut)
async def list_memories(
    caller: Tenant,
    svc: Svc,
    scope: QueryScope,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> MemoriesOut:
    """The scope's memories, oldest first, a page at a time."""
    return await _scan(svc, caller.tenant_id, scope, None, offset, limit)


@router.post("/memories/scan", tags=["memories"], response_model=MemoriesOut)
async def scan_memories(body: ScanIn, caller: Tenant, svc: Svc) -> MemoriesOut:
    """The scope's memories matching `filters`, oldest first, a page at a time."""
    return await _scan(svc, caller.tenant_id, body.scope(), body.filters, body.offset, body.limit)


async def _scan(
    svc: Svc,
    tenant_id: str,
    scope: dict[str, str],
    filters: dict[str, Any] | None,
    offset: int,
    limit: int,
) -> MemoriesOut:
    limit = min(limit, svc.settings.max_page)
    hits = await svc.call(
        svc.memory.scan,
        filters=filters,
        offset=offset,
        limit=limit + 1,
        tenant_id=tenant_id,
        **scope,
    )
    window, next_offset = page_of(hits, offset, limit)
    return MemoriesOut(memories=[memory_out(hit) for hit in window], next_offset=next_offset)


@router.post("/memories/count", tags=["memories"], response_model=CountOut)
async def count_memories(body: CountIn, caller: Tenant, svc: Svc) -> CountOut:
    """How many memories the scope holds (matching `filters`)."""
    count = await svc.call(
        svc.memory.count, filters=body.filters, tenant_id=caller.tenant_id, **body.scope()
    )
    return CountOut(count=count)


@router.post("/memories/lookup", tags=["memories"], response_model=MemoriesOut)
async def lookup_memories(body: IdsIn, caller: Tenant, svc: Svc) -> MemoriesOut:
    """The memories with these ids in the scope, in the order asked; others left out."""
    hits = await svc.call(svc.memory.get_many, body.ids, tenant_id=caller.tenant_id, **body.scope())
    return MemoriesOut(memories=[memory_out(hit) for hit in hits], next_offset=None)


@router.post("/memories/delete", tags=["memories"], response_model=DeletedOut)
async def delete_memories(body: IdsIn, caller: Tenant, svc: Svc) -> DeletedOut:
    """Delete the memories with these ids in the scope (others skipped), in one transaction."""
    deleted = await svc.call(
        svc.memory.delete_many, body.ids, tenant_id=caller.tenant_id, **body.scope()
    )
    return DeletedOut(deleted=deleted)


@router.delete("/memories", tags=["memories"], response_model=DeletedOut)
async def delete_scope(caller: Tenant, svc: Svc, scope: QueryScope) -> DeletedOut:
    """Delete every memory of a scope: name at least one of user_id, agent_id, session_id."""
    if not scope:
        raise InvalidInputError("scope", "name user_id, agent_id or session_id to delete a scope")
    deleted = await svc.call(svc.memory.delete_scope, tenant_id=caller.tenant_id, **scope)
    return DeletedOut(deleted=deleted)


@router.get("/memories/{memory_id:path}", tags=["memories"], response_model=MemoryOut)
async def get_memory(
    memory_id: RecordPath, caller: Tenant, svc: Svc, scope: QueryScope
) -> MemoryOut:
    """One memory of the scope; 404 when the scope holds none with this id."""
    hit = await svc.call(svc.memory.get, memory_id, tenant_id=caller.tenant_id, **scope)
    if hit is None:
        raise NotFoundError("record", memory_id)
    return memory_out(hit)


@router.patch("/memories/{memory_id:path}", tags=["memories"], response_model=MemoryOut)
async def update_memory(
    memory_id: RecordPath, body: PatchIn, caller: Tenant, svc: Svc
) -> MemoryOut:
    """Change a memory's text (re-embedded) and/or replace its metadata."""
    scope = {"tenant_id": caller.tenant_id, **body.scope()}
    await svc.call(svc.memory.update, memory_id, body.text, body.metadata, **scope)
    hit = await svc.call(svc.memory.get, memory_id, **scope)
    if hit is None:  # deleted in between
        raise NotFoundError("record", memory_id)
    return memory_out(hit)


@router.delete("/memories/{memory_id:path}", tags=["memories"], status_code=204)
async def delete_memory(
    memory_id: RecordPath, caller: Tenant, svc: Svc, scope: QueryScope
) -> Response:
    """Delete one memory of the scope; 404 when the scope holds none with this id."""
    await svc.call(svc.memory.delete, memory_id, tenant_id=caller.tenant_id, **scope)
    return Response(status_code=204)


@router.post("/search", tags=["search"], response_model=HitsOut)
async def search(body: SearchIn, caller: Tenant, svc: Svc) -> HitsOut:
    """The k best memories of the scope for a query (hybrid, vector or keyword), best first."""
    hits = await svc.call(
        svc.memory.search,
        body.query,
        k=body.k,
        filters=body.filters,
        mode=body.mode,
        tenant_id=caller.tenant_id,
        **body.scope(),
    )
    return HitsOut(hits=[memory_out(hit) for hit in hits])


@router.post("/search/vector", tags=["search"], response_model=HitsOut)
async def search_by_vector(body: VectorSearchIn, caller: Tenant, svc: Svc) -> HitsOut:
    """The k memories nearest to a query vector of the embedder's width (cosine)."""
    hits = await svc.call(
        svc.memory.search_by_vector,
        body.vector,
        k=body.k,
        filters=body.filters,
        tenant_id=caller.tenant_id,
        **body.scope(),
    )
    return HitsOut(hits=[memory_out(hit) for hit in hits])


@router.post("/context", tags=["search"], response_model=ContextOut)
async def context(body: ContextIn, caller: Tenant, svc: Svc) -> ContextOut:
    """What the scope holds for a query, packed into at most `budget_tokens` tokens of prompt
    text (`ranked`: best hits first; `crag`: one representative per cluster), with the ids
    of the memories it quotes."""
    packed = await svc.call(
        svc.memory.context,
        body.query,
        budget_tokens=body.budget_tokens,
        k=body.k,
        strategy=body.strategy,
        filters=body.filters,
        tenant_id=caller.tenant_id,
        **body.scope(),
    )
    return ContextOut(
        text=packed.text,
        ids=packed.ids,
        tokens=packed.tokens,
        parts=[PartOut(text=part.text, ids=part.ids) for part in packed.parts],
    )
