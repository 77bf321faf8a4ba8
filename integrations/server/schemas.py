"""Request and response bodies. Requests refuse unknown fields (a `tenant_id` in a body is an
error, not ignored); sizes beyond `Memory`'s own limits are checked by `Memory`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ScopeValue = Annotated[str, Field(min_length=1, max_length=256)]
RecordId = Annotated[str, Field(min_length=1, max_length=128)]
Metadata = dict[str, Any]
Filters = dict[str, Any]
Count = Annotated[int, Field(ge=1, le=1000)]


class Strict(BaseModel):
    """A request body: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


class ScopeIn(Strict):
    """The scope inside the caller's tenant; each field set narrows it."""

    user_id: ScopeValue | None = None
    agent_id: ScopeValue | None = None
    session_id: ScopeValue | None = None

    def scope(self) -> dict[str, str]:
        """The set fields, as `Memory` keyword arguments."""
        return {k: v for k in ("user_id", "agent_id", "session_id") if (v := getattr(self, k))}


class MemoryIn(ScopeIn):
    text: str
    metadata: Metadata | None = None
    id: RecordId | None = Field(default=None, description="replaces the tenant's record `id`")


class Item(Strict):
    text: str
    metadata: Metadata | None = None
    id: RecordId | None = None


class BulkIn(ScopeIn):
    items: list[Item] = Field(min_length=1, max_length=1000)


class IdsIn(ScopeIn):
    ids: list[RecordId] = Field(min_length=1, max_length=1000)


class PatchIn(ScopeIn):
    text: str | None = None
    metadata: Metadata | None = Field(default=None, description="replaces the metadata")


class ScanIn(ScopeIn):
    filters: Filters | None = None
    offset: int = Field(default=0, ge=0, le=10_000_000)
    limit: Count = 100


class CountIn(ScopeIn):
    filters: Filters | None = None


class SearchIn(ScopeIn):
    query: str
    k: Count = 5
    filters: Filters | None = None
    mode: Literal["hybrid", "vector", "keyword"] = "hybrid"


class VectorSearchIn(ScopeIn):
    vector: list[float] = Field(min_length=1, max_length=8192)
    k: Count = 5
    filters: Filters | None = None


class ContextIn(ScopeIn):
    query: str
    budget_tokens: int = Field(ge=1, le=1_000_000)
    k: Count = 20
    strategy: Literal["ranked", "crag"] = "ranked"
    filters: Filters | None = None


class MessageIn(Strict):
    role: str = Field(min_length=1, max_length=64, description="user, assistant, system, tool...")
    content: str
    metadata: Metadata | None = None


class MessagesIn(Strict):
    messages: list[MessageIn] = Field(min_length=1, max_length=1000)
    agent_id: ScopeValue | None = None


class SessionIn(Strict):
    session_id: ScopeValue | None = Field(default=None, description="random when left out")


class TenantIn(Strict):
    tenant_id: str | None = Field(
        default=None, max_length=64, description="letters, digits, _ . -; random when left out"
    )
    name: str | None = Field(default=None, min_length=1, max_length=200)


class KeyIn(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=200)


# -- responses ---------------------------------------------------------------------------


class MemoryOut(BaseModel):
    id: str
    text: str
    score: float
    metadata: Metadata
    tenant_id: str | None = None
    user_id: str | None = None
    agent_id: str | None = None
    session_id: str | None = None
    created_at: float
    updated_at: float


class IdOut(BaseModel):
    id: str


class IdsOut(BaseModel):
    ids: list[str]


class HitsOut(BaseModel):
    hits: list[MemoryOut]


class MemoriesOut(BaseModel):
    memories: list[MemoryOut]
    next_offset: int | None = Field(description="offset of the next page; null on the last")


class CountOut(BaseModel):
    count: int


class DeletedOut(BaseModel):
    deleted: int


class PartOut(BaseModel):
    text: str
    ids: list[str]


class ContextOut(BaseModel):
    text: str
    ids: list[str]
    tokens: int
    parts: list[PartOut]


class MessageOut(BaseModel):
    id: str
    role: str
    content: str
    metadata: Metadata
    agent_id: str | None = None
    created_at: float


class MessagesOut(BaseModel):
    messages: list[MessageOut]
    next_offset: int | None


class SessionOut(BaseModel):
    user_id: str
    session_id: str
    created_at: float


class SessionsOut(BaseModel):
    sessions: list[SessionOut]
    next_offset: int | None


class UsersOut(BaseModel):
    users: list[str]
    next_offset: int | None


class ExportOut(BaseModel):
    user_id: str
    sessions: list[SessionOut]
    memories: list[MemoryOut]
    next_offset: int | None = Field(description="offset of the next page of memories")


class WhoAmIOut(BaseModel):
    tenant_id: str
    key_id: str
    records: int


class TenantOut(BaseModel):
    tenant_id: str
    name: str
    created_at: float


class TenantsOut(BaseModel):
    tenants: list[TenantOut]
    next_offset: int | None


class KeyOut(BaseModel):
    key_id: str
    tenant_id: str
    name: str
    created_at: float
    revoked_at: float | None


class NewKeyOut(KeyOut):
    api_key: str = Field(description="shown this once; only its hash is stored")


class KeysOut(BaseModel):
    keys: list[KeyOut]


class StatusOut(BaseModel):
    status: str


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorOut(BaseModel):
    error: ErrorBody
