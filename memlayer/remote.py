"""`RemoteMemory` and `AsyncRemoteMemory`: the `Memory` API over HTTP, against `memlayer serve`.

Same methods, same answers, same errors (`MemlayerError` subclasses rebuilt from the service's
JSON errors), so code moves from the embedded store to the service by changing one line. The
tenant is the API key's: a `tenant_id` argument is refused. Needs httpx (`memlayer[server]`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from memlayer.chunking import chunk_stream
from memlayer.context import Context, ContextPart
from memlayer.errors import (
    AuthenticationError,
    CapacityError,
    ClosedError,
    InvalidInputError,
    MemlayerError,
    ModelMismatchError,
    NotFoundError,
    StorageError,
)
from memlayer.optional import require
from memlayer.types import Hit, Scope

_PAGE = 1000  # the service's largest page and batch


@dataclass(frozen=True)
class _Call:
    """One HTTP request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[Any], Any]
    json: Any = None
    params: Mapping[str, Any] | None = None
    record: str | None = None  # the id a 404 is about


def _scope(scope: Mapping[str, Any]) -> dict[str, str]:
    """The scope fields of a call (the tenant is the key's, never an argument)."""
    if scope.get("tenant_id") is not None:
        raise InvalidInputError(
            "tenant_id", "is the API key's tenant on a RemoteMemory; leave it out"
        )
    return {k: v for k, v in Scope.of(scope).as_dict().items() if k != "tenant_id"}


def _hit(row: Mapping[str, Any]) -> Hit:
    return Hit(
        id=row["id"],
        text=row["text"],
        score=float(row["score"]),
        metadata=dict(row["metadata"]),
        scope=Scope(**{k: row.get(k) for k in ("tenant_id", "user_id", "agent_id", "session_id")}),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )


def _hits(key: str) -> Callable[[Any], list[Hit]]:
    return lambda body: [_hit(row) for row in body[key]]


def _context(body: Mapping[str, Any]) -> Context:
    parts = [ContextPart(text=part["text"], ids=list(part["ids"])) for part in body["parts"]]
    return Context(text=body["text"], ids=list(body["ids"]), tokens=body["tokens"], parts=parts)


def _items(items: Iterable[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            out.append({"text": item})
        elif isinstance(item, Mapping):
            out.append(dict(item))
        else:
            raise InvalidInputError(f"items[{index}]", "must be a string or a dict with 'text'")
    return out


def _ids(ids: object) -> list[str]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise InvalidInputError("ids", "must be a list of ids, not a single id or a scalar")
    return list(ids)


def _batches(values: list[Any], size: int = _PAGE) -> Iterator[list[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _check_tokenizer(tokenizer: object, strategy: object) -> None:
    if tokenizer is not None:
        raise InvalidInputError("tokenizer", "is the service's on a RemoteMemory; leave it out")
    if strategy not in ("ranked", "crag"):
        raise InvalidInputError("strategy", "must be 'ranked' or 'crag' on a RemoteMemory")


class _Calls:
    """The requests behind each `Memory` method (shared by the sync and async clients)."""

    def add_many(self, items: list[dict[str, Any]], scope: dict[str, str]) -> _Call:
        body = {"items": items, **scope}
        return _Call("POST", "/v1/memories/bulk", lambda b: list(b["ids"]), json=body)

    def update(self, id: str, text: str | None, metadata: Any, scope: Mapping[str, Any]) -> _Call:
        body = {"text": text, "metadata": metadata, **_scope(scope)}
        path = "/v1/memories/" + quote(str(id), safe="").replace(".", "%2E")
        return _Call("PATCH", path, lambda b: None, json=body, record=str(id))

    def delete_many(self, ids: list[str], scope: dict[str, str]) -> _Call:
        return _Call(
            "POST", "/v1/memories/delete", lambda b: int(b["deleted"]), json={"ids": ids, **scope}
        )

    def delete_scope(self, scope: Mapping[str, Any]) -> _Call:
        named = _scope(scope)
        if not named:
            raise InvalidInputError("scope", "name at least one scope field to delete a scope")
        return _Call("DELETE", "/v1/memories", lambda b: int(b["deleted"]), params=named)

    def get_many(self, ids: list[str], scope: dict[str, str]) -> _Call:
        body = {"ids": ids, **scope}
        return _Call("POST", "/v1/memories/lookup", _hits("memories"), json=body)

    def scan(self, filters: Any, offset: int, limit: int, scope: dict[str, str]) -> _Call:
        body = {"filters": filters, "offset": offset, "limit": limit, **scope}
        return _Call("POST", "/v1/memories/scan", lambda b: b, json=body)

    def count(self, filters: Any, scope: Mapping[str, Any]) -> _Call:
        body = {"filters": filters, **_scope(scope)}
        return _Call("POST", "/v1/memories/count", lambda b: int(b["count"]), json=body)

    def search(
        self, query: str, k: int, filters: Any, mode: str, scope: Mapping[str, Any]
    ) -> _Call:
        body = {"query": query, "k": k, "filters": filters, "mode": mode, **_scope(scope)}
        return _Call("POST", "/v1/search", _hits("hits"), json=body)

    def search_by_vector(
        self, vector: Sequence[float], k: int, filters: Any, scope: Mapping[str, Any]
    ) -> _Call:
        try:
            values = [float(x) for x in vector]
        except (TypeError, ValueError) as exc:
            raise InvalidInputError("vector", "must be a sequence of numbers") from exc
        body = {"vector": values, "k": k, "filters": filters, **_scope(scope)}
        return _Call("POST", "/v1/search/vector", _hits("hits"), json=body)

    def context(
        self,
        query: str,
        budget_tokens: int,
        k: int,
        strategy: Any,
        tokenizer: Any,
        filters: Any,
        scope: Mapping[str, Any],
    ) -> _Call:
        _check_tokenizer(tokenizer, strategy)
        body = {
            "query": query,
            "budget_tokens": budget_tokens,
            "k": k,
            "strategy": strategy,
            "filters": filters,
            **_scope(scope),
        }
        return _Call("POST", "/v1/context", _context, json=body)

    def me(self) -> _Call:
        return _Call("GET", "/v1/me", dict)


def _error(status: int, body: Any, call: _Call) -> MemlayerError:
    """The MemlayerError a service error stands for."""
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        return StorageError(f"the memory service answered {status} without an error body")
    code, message = str(error.get("code")), str(error.get("message"))
    field = error.get("field")
    if code == "invalid_input" or (code == "too_large" and status == 413):
        name = str(field or "request")
        return InvalidInputError(name, message.removeprefix(f"{name}: "))
    if code == "not_found":
        return (
            NotFoundError("record", call.record)
            if call.record
            else NotFoundError("resource", call.path)
        )
    if code == "unauthorized":
        return AuthenticationError(message)
    if code in ("rate_limited", "capacity"):
        return CapacityError(message)
    if code == "model_mismatch":
        return ModelMismatchError(message)
    return StorageError(f"the memory service failed ({status} {code}): {message}")


def _answer(response: Any, call: _Call) -> Any:
    try:
        body = response.json() if response.content else None
    except ValueError:
        body = None
    if response.status_code >= 400:
        raise _error(response.status_code, body, call)
    return call.parse(body)


class _Client:
    """What the two clients share: where the service is and who is calling."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        require("httpx", "server")
        key = api_key or os.environ.get("MEMLAYER_API_KEY")
        if not key:
            raise InvalidInputError("api_key", "is required (or set MEMLAYER_API_KEY)")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InvalidInputError("url", "must be an http:// or https:// URL", url)
        self.url = url.rstrip("/")
        self.api_key = key
        self.timeout = timeout
        self._calls = _Calls()
        self._closed = False
        self._headers = {"Authorization": f"Bearer {key}"}

    def _request(self, call: _Call) -> dict[str, Any]:
        if self._closed:
            raise ClosedError("RemoteMemory")
        body = None if call.json is None else {k: v for k, v in call.json.items() if v is not None}
        return {
            "method": call.method,
            "url": self.url + call.path,
            "json": body,
            "params": call.params,
            "headers": self._headers,
        }

    def _unreachable(self, exc: Exception) -> StorageError:
        return StorageError(f"the memory service at {self.url} is unreachable: {exc}")


class RemoteMemory(_Client):
    """A `Memory` kept by a memlayer service: `RemoteMemory("http://host:8000", api_key=...)`.

    `api_key` defaults to `MEMLAYER_API_KEY`; `client` may be any `httpx.Client` (such as
    FastAPI's TestClient) to send the requests through.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        client: Any = None,
    ) -> None:
        super().__init__(url, api_key, timeout)
        httpx = require("httpx", "server")
        self._owns_client = client is None
        self._http = client if client is not None else httpx.Client(timeout=timeout)

    def _do(self, call: _Call) -> Any:
        import httpx

        try:
            response = self._http.request(**self._request(call))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return _answer(response, call)

    def asynchronous(self) -> AsyncRemoteMemory:
        """The awaitable twin: the same service and key."""
        return AsyncRemoteMemory(self.url, self.api_key, timeout=self.timeout)

    def add(
        self,
        text: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        id: str | None = None,
        **scope: str | None,
    ) -> str:
        """See `Memory.add`."""
        return self.add_many([{"text": text, "metadata": metadata, "id": id}], **scope)[0]

    def add_many(self, items: Iterable[str | Mapping[str, Any]], **scope: str | None) -> list[str]:
        """See `Memory.add_many` (more than 1,000 items go in several requests)."""
        named, rows = _scope(scope), _items(items)
        ids: list[str] = []
        for batch in _batches(rows):
            ids += self._do(self._calls.add_many(batch, named))
        return ids

    def ingest(
        self,
        stream: Iterable[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        chunk_tokens: int = 200,
        overlap: int = 40,
        **scope: str | None,
    ) -> int:
        """See `Memory.ingest`: chunked here, stored in batches."""
        stored = 0
        for batch in _chunk_batches(stream, metadata, chunk_tokens, overlap):
            stored += len(self.add_many(batch, **scope))
        return stored

    def update(
        self,
        id: str,
        text: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        **scope: str | None,
    ) -> None:
        """See `Memory.update`."""
        self._do(self._calls.update(id, text, metadata, scope))

    def delete(self, id: str, **scope: str | None) -> None:
        """See `Memory.delete`."""
        if self.delete_many([id], **scope) == 0:
            raise NotFoundError("record", id)

    def delete_many(self, ids: Iterable[str], **scope: str | None) -> int:
        """See `Memory.delete_many`."""
        named, wanted = _scope(scope), _ids(ids)
        return sum(self._do(self._calls.delete_many(b, named)) for b in _batches(wanted))

    def delete_scope(self, **scope: str | None) -> int:
        """See `Memory.delete_scope`."""
        return int(self._do(self._calls.delete_scope(scope)))

    def get(self, id: str, **scope: str | None) -> Hit | None:
        """See `Memory.get`."""
        found = self.get_many([id], **scope)
        return found[0] if found else None

    def get_many(self, ids: Iterable[str], **scope: str | None) -> list[Hit]:
        """See `Memory.get_many`."""
        named, wanted = _scope(scope), _ids(ids)
        return [hit for b in _batches(wanted) for hit in self._do(self._calls.get_many(b, named))]

    def scan(
        self,
        *,
        filters: Mapping[str, Any] | None = None,
        limit: int | None = None,
        offset: int = 0,
        **scope: str | None,
    ) -> list[Hit]:
        """See `Memory.scan` (fetched a page at a time)."""
        named, hits = _scope(scope), []
        for page_offset, page_limit in _pages(offset, limit):
            body = self._do(self._calls.scan(filters, page_offset, page_limit, named))
            hits += _hits("memories")(body)
            if body["next_offset"] is None:
                break
        return hits

    def count(self, *, filters: Mapping[str, Any] | None = None, **scope: str | None) -> int:
        """See `Memory.count`."""
        return int(self._do(self._calls.count(filters, scope)))

    def search(
        self,
        query: str,
        *,
        k: int = 5,
        filters: Mapping[str, Any] | None = None,
        mode: str = "hybrid",
        **scope: str | None,
    ) -> list[Hit]:
        """See `Memory.search`."""
        return list(self._do(self._calls.search(query, k, filters, mode, scope)))

    def search_by_vector(
        self,
        vector: Sequence[float],
        *,
        k: int = 5,
        filters: Mapping[str, Any] | None = None,
        **scope: str | None,
    ) -> list[Hit]:
        """See `Memory.search_by_vector`."""
        return list(self._do(self._calls.search_by_vector(vector, k, filters, scope)))

    def context(
        self,
        query: str,
        *,
        budget_tokens: int,
        k: int = 20,
        strategy: str = "ranked",
        tokenizer: Any = None,
        filters: Mapping[str, Any] | None = None,
        **scope: str | None,
    ) -> Context:
        """See `Memory.context` (a named strategy; tokens are counted by the service)."""
        call = self._calls.context(query, budget_tokens, k, strategy, tokenizer, filters, scope)
        result: Context = self._do(call)
        return result

    def stats(self) -> dict[str, Any]:
        """The tenant, the key and how many memories the tenant holds."""
        return {**self._do(self._calls.me()), "url": self.url}

    def close(self) -> None:
        """Release the connections; further calls raise ClosedError."""
        if not self._closed and self._owns_client:
            self._http.close()
        self._closed = True

    def __enter__(self) -> RemoteMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRemoteMemory(_Client):
    """The awaitable twin of `RemoteMemory` (httpx's AsyncClient; `client` may be one)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        client: Any = None,
    ) -> None:
        super().__init__(url, api_key, timeout)
        httpx = require("httpx", "server")
        self._owns_client = client is None
        self._http = client if client is not None else httpx.AsyncClient(timeout=timeout)

    async def _do(self, call: _Call) -> Any:
        import httpx

        try:
            response = await self._http.request(**self._request(call))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return _answer(response, call)

    @property
    def sync(self) -> RemoteMemory:
        """A synchronous client of the same service and key."""
        return RemoteMemory(self.url, self.api_key, timeout=self.timeout)

    async def add(
        self,
        text: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        id: str | None = None,
        **scope: str | None,
    ) -> str:
        """See `Memory.add`."""
        ids = await self.add_many([{"text": text, "metadata": metadata, "id": id}], **scope)
        return ids[0]

    async def add_many(
        self, items: Iterable[str | Mapping[str, Any]], **scope: str | None
    ) -> list[str]:
        """See `Memory.add_many`."""
        named, rows = _scope(scope), _items(items)
        ids: list[str] = []
        for batch in _batches(rows):
            ids += await self._do(self._calls.add_many(batch, named))
        return ids

    async def ingest(
        self,
        stream: Iterable[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        chunk_tokens: int = 200,
        overlap: int = 40,
        **scope: str | None,
    ) -> int:
        """See `Memory.ingest`."""
        stored = 0
        for batch in _chunk_batches(stream, metadata, chunk_tokens, overlap):
            stored += len(await self.add_many(batch, **scope))
        return stored

    async def update(
        self,
        id: str,
        text: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        **scope: str | None,
    ) -> None:
        """See `Memory.update`."""
        await self._do(self._calls.update(id, text, metadata, scope))

    async def delete(self, id: str, **scope: str | None) -> None:
        """See `Memory.delete`."""
        if await self.delete_many([id], **scope) == 0:
            raise NotFoundError("record", id)

    async def delete_many(self, ids: Iterable[str], **scope: str | None) -> int:
        """See `Memory.delete_many`."""
        named, wanted = _scope(scope), _ids(ids)
        return sum([await self._do(self._calls.delete_many(b, named)) for b in _batches(wanted)])

    async def delete_scope(self, **scope: str | None) -> int:
        """See `Memory.delete_scope`."""
        return int(await self._do(self._calls.delete_scope(scope)))

    async def get(self, id: str, **scope: str | None) -> Hit | None:
        """See `Memory.get`."""
        found = await self.get_many([id], **scope)
        return found[0] if found else None

    async def get_many(self, ids: Iterable[str], **scope: str | None) -> list[Hit]:
        """See `Memory.get_many`."""
        named, wanted, hits = _scope(scope), _ids(ids), []
        for batch in _batches(wanted):
            hits += await self._do(self._calls.get_many(batch, named))
        return hits

    async def scan(
        self,
        *,
        filters: Mapping[str, Any] | None = None,
        limit: int | None = None,
        offset: int = 0,
        **scope: str | None,
    ) -> list[Hit]:
        """See `Memory.scan`."""
        named, hits = _scope(scope), []
        for page_offset, page_limit in _pages(offset, limit):
            body = await self._do(self._calls.scan(filters, page_offset, page_limit, named))
            hits += _hits("memories")(body)
            if body["next_offset"] is None:
                break
        return hits

    async def count(self, *, filters: Mapping[str, Any] | None = None, **scope: str | None) -> int:
        """See `Memory.count`."""
        return int(await self._do(self._calls.count(filters, scope)))

    async def search(
        self,
        query: str,
        *,
        k: int = 5,
        filters: Mapping[str, Any] | None = None,
        mode: str = "hybrid",
        **scope: str | None,
    ) -> list[Hit]:
        """See `Memory.search`."""
        return list(await self._do(self._calls.search(query, k, filters, mode, scope)))

    async def search_by_vector(
        self,
        vector: Sequence[float],
        *,
        k: int = 5,
        filters: Mapping[str, Any] | None = None,
        **scope: str | None,
    ) -> list[Hit]:
        """See `Memory.search_by_vector`."""
        return list(await self._do(self._calls.search_by_vector(vector, k, filters, scope)))

    async def context(
        self,
        query: str,
        *,
        budget_tokens: int,
        k: int = 20,
        strategy: str = "ranked",
        tokenizer: Any = None,
        filters: Mapping[str, Any] | None = None,
        **scope: str | None,
    ) -> Context:
        """See `Memory.context`."""
        call = self._calls.context(query, budget_tokens, k, strategy, tokenizer, filters, scope)
        result: Context = await self._do(call)
        return result

    async def stats(self) -> dict[str, Any]:
        """See `RemoteMemory.stats`."""
        return {**await self._do(self._calls.me()), "url": self.url}

    async def close(self) -> None:
        """Release the connections."""
        if not self._closed and self._owns_client:
            await self._http.aclose()
        self._closed = True

    async def __aenter__(self) -> AsyncRemoteMemory:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _pages(offset: int, limit: int | None) -> Iterator[tuple[int, int]]:
    """(offset, limit) of each page of a scan of at most `limit` records from `offset`."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidInputError("offset", "must be an integer >= 0", offset)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InvalidInputError("limit", "must be an integer >= 0", limit)
    left = limit
    while left is None or left > 0:
        size = _PAGE if left is None else min(_PAGE, left)
        yield offset, size
        offset += size
        if left is not None:
            left -= size


def _chunk_batches(
    stream: Iterable[str],
    metadata: Mapping[str, Any] | None,
    chunk_tokens: int,
    overlap: int,
    size: int = 64,
) -> Iterator[list[dict[str, Any]]]:
    if isinstance(stream, str):
        stream = [stream]
    batch: list[dict[str, Any]] = []
    chunks = chunk_stream(stream, chunk_tokens=chunk_tokens, overlap=overlap)
    for position, chunk in enumerate(chunks):
        batch.append({"text": chunk, "metadata": {**(metadata or {}), "chunk": position}})
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
