"""Tenants and their API keys, for the holder of the admin token (`MEMLAYER_ADMIN_TOKEN`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from memlayer.integrations.server.auth import Admin
from memlayer.integrations.server.schemas import (
    KeyIn,
    KeyOut,
    KeysOut,
    NewKeyOut,
    TenantIn,
    TenantOut,
    TenantsOut,
)
from memlayer.integrations.server.service import Svc, page_of

router = APIRouter(prefix="/v1/tenants", tags=["admin"], dependencies=[Admin])
TenantPath = Annotated[str, Path(min_length=1, max_length=64)]


@router.post("", status_code=201, response_model=TenantOut)
async def create_tenant(body: TenantIn, svc: Svc) -> TenantOut:
    """Create a tenant (its id given, or random)."""
    return TenantOut(**await svc.call(svc.tenants.create_tenant, body.name, body.tenant_id))


@router.get("", response_model=TenantsOut)
async def list_tenants(
    svc: Svc,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> TenantsOut:
    """Every tenant, oldest first."""
    rows = await svc.call(svc.tenants.list_tenants, offset, limit + 1)
    window, next_offset = page_of(rows, offset, limit)
    return TenantsOut(tenants=[TenantOut(**row) for row in window], next_offset=next_offset)


@router.get("/{tenant_id}", response_model=TenantOut)
async def get_tenant(tenant_id: TenantPath, svc: Svc) -> TenantOut:
    """One tenant; 404 when there is none."""
    return TenantOut(**await svc.call(svc.tenants.tenant, tenant_id))


@router.post("/{tenant_id}/keys", status_code=201, response_model=NewKeyOut)
async def create_key(tenant_id: TenantPath, body: KeyIn, svc: Svc) -> NewKeyOut:
    """A new API key of the tenant. `api_key` is in this answer only: store it now."""
    return NewKeyOut(**await svc.call(svc.tenants.create_key, tenant_id, body.name))


@router.get("/{tenant_id}/keys", response_model=KeysOut)
async def list_keys(tenant_id: TenantPath, svc: Svc) -> KeysOut:
    """The tenant's keys, revoked ones included (never their secrets)."""
    return KeysOut(keys=[KeyOut(**row) for row in await svc.call(svc.tenants.list_keys, tenant_id)])


@router.delete("/{tenant_id}/keys/{key_id}", response_model=KeyOut)
async def revoke_key(
    tenant_id: TenantPath, key_id: Annotated[str, Path(min_length=1, max_length=32)], svc: Svc
) -> KeyOut:
    """Revoke a key: this process refuses it from the next request on, every other process
    within `MEMLAYER_SERVER_KEY_CACHE_S` seconds (5 by default)."""
    revoked = await svc.call(svc.tenants.revoke_key, tenant_id, key_id)
    svc.keys.forget(key_id)
    return KeyOut(**revoked)
