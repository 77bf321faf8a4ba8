"""`MemlayerStore`: a LangGraph long-term store (`BaseStore`) kept in a memlayer `Memory`.

Each item is a record of one tenant (the store's `tenant_id`). Its metadata holds the value
(so LangGraph filters become memlayer filters on `value.<field>`) and its place: the
namespace, as a dotted string and label by label (so a namespace prefix is a filter too),
and its key. The record id is a hash of namespace and key, so a put replaces the item and
keeps its `created_at`.

With an `index` config, every text the configured fields yield is embedded by the memory's
embedder: the first as the item's own record, each further one as a part record carrying a
copy of the value, so `search(query=...)` is one filtered vector search whose best part
scores its item (max pooling, as `InMemoryStore`). Listings follow `InMemoryStore`'s order:
namespaces in the order they first got an item, items in the order they were first put.

`batch` and `abatch` share one plan of memory calls (a generator); `batch` runs it on the
`Memory`, `abatch` awaits each call on the `AsyncMemory`. TTL is not supported: a `ttl` is
refused with `NotImplementedError`, as `BaseStore` does for stores without TTL.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from langgraph.store.base import (
    BaseStore,
    GetOp,
    IndexConfig,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    ensure_embeddings,
    get_text_at_path,
    validate_op_namespace,
)

from memlayer import AsyncMemory, Hit, InvalidInputError, Memory, Scope
from memlayer.integrations.langchain.documents import MemoryPair

T = TypeVar("T")

_PLACE = "langgraph"  # the metadata key holding an item's namespace, key and part
_ITEM: dict[str, Any] = {f"{_PLACE}.part": 0}  # the record holding the item (part 0)
_VECTOR: dict[str, Any] = {f"{_PLACE}.vector": True}  # the records of indexed texts
_OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte")  # LangGraph's filter operators


@dataclass(frozen=True)
class _Call:
    """One `Memory` method call a plan asks for; the driver adds the store's tenant."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


Plan = Generator[_Call, Any, T]


class MemlayerStore(BaseStore):
    """LangGraph's long-term memory in memlayer: persistent, tenant-isolated, searchable.

    `memory` is a `Memory` or `AsyncMemory` (its embedder embeds the indexed texts); without
    one, the store opens a `Memory` on `path` (or a database `url`: SQLite, PostgreSQL) whose
    embedder is `index["embed"]` (a LangChain
    `Embeddings`, a function `texts -> vectors`, or a memlayer embedder name such as "hash"),
    and `close()` closes it. `index` is LangGraph's config: `fields` (default `["$"]`, the
    whole value) and `dims` (checked against the embedder). Without `index`, a query is
    ignored, as `InMemoryStore` ignores it.

    >>> store = MemlayerStore(path="./graph-memory", index={"embed": "hash", "fields": ["text"]})
    >>> store.put(("users", "ada"), "seat", {"text": "prefers window seats"})
    >>> store.put(("users", "ada"), "food", {"text": "vegetarian, no mushrooms"})
    >>> store.search(("users",), query="window seats", limit=1)[0].key
    'seat'
    """

    def __init__(
        self,
        memory: Memory | AsyncMemory | None = None,
        *,
        path: str | Path | None = None,
        url: str | None = None,
        index: IndexConfig | None = None,
        tenant_id: str | None = None,
    ) -> None:
        embed = (index or {}).get("embed")
        if memory is None:
            self._pair = MemoryPair.of(Memory(path=path, url=url, embedder=_embedder(embed)))
        elif path is not None or url is not None or embed is not None:
            raise InvalidInputError(
                "path" if path is not None else "url" if url is not None else "index.embed",
                "leave it out when passing a memory: the memory's folder and embedder are used",
            )
        else:
            self._pair = MemoryPair.of(memory)
            self._pair.local("MemlayerStore")
        self._owns_memory = memory is None
        self._scope = Scope.of({"tenant_id": tenant_id}).as_dict()
        self._fields: list[str] | None = None
        if index is not None:
            dim = self._pair.local("MemlayerStore").embedder.dim
            if index.get("dims", dim) != dim:
                raise InvalidInputError("index.dims", f"must equal the embedder's width {dim}")
            self._fields = list(index.get("fields") or ["$"])

    def close(self) -> None:
        """Close the `Memory` this store opened (a memory passed in stays its owner's)."""
        if self._owns_memory:
            self._pair.sync.close()

    # -- BaseStore ----------------------------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run the ops on the `Memory`: reads see the store as it was before the batch's
        puts, which are applied last, the last put of a key winning (as `InMemoryStore`)."""
        plan = self._plan(list(ops))
        try:
            call = next(plan)
            while True:
                method = getattr(self._pair.sync, call.method)
                call = plan.send(method(*call.args, **call.kwargs, **self._scope))
        except StopIteration as done:
            return done.value

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """`batch`, awaiting each memory call on the `AsyncMemory`."""
        plan = self._plan(list(ops))
        try:
            call = next(plan)
            while True:
                method = getattr(self._pair.aio, call.method)
                call = plan.send(await method(*call.args, **call.kwargs, **self._scope))
        except StopIteration as done:
            return done.value

    # -- the plan -------------------------------------------------------------------------

    def _plan(self, ops: list[Op]) -> Plan[list[Result]]:
        """Every op checked first (bad input changes nothing), then reads, then writes."""
        filters = [_check(op) for op in ops]
        results: list[Result] = [None] * len(ops)
        gets = {i: op for i, op in enumerate(ops) if isinstance(op, GetOp)}
        if gets:
            ids = [_item_id(op.namespace, op.key) for op in gets.values()]
            found = {hit.id: hit for hit in (yield _Call("get_many", (ids,)))}
            for (i, _), rid in zip(gets.items(), ids, strict=True):
                results[i] = _item(found[rid]) if rid in found else None
        for i, op in enumerate(ops):
            if isinstance(op, SearchOp):
                results[i] = yield from self._search(op, filters[i])
            elif isinstance(op, ListNamespacesOp):
                results[i] = yield from _list_namespaces(op)
        puts = {(op.namespace, op.key): op for op in ops if isinstance(op, PutOp)}
        if puts:
            yield from self._write(list(puts.values()))
        return results

    def _search(self, op: SearchOp, where: list[dict[str, Any]]) -> Plan[list[SearchItem]]:
        """Semantic when a query meets an index: items ranked by their best part, then, if
        the page is short, unindexed items (offset not applied, as `InMemoryStore` does);
        otherwise a listing."""
        if op.namespace_prefix:
            where = [_labels(op.namespace_prefix), *where]
        wanted = op.offset + op.limit
        if not (op.query and self._fields is not None):
            listed = yield from _listed(where, wanted)
            return listed[op.offset :]
        if op.limit == 0:
            return []
        ranked = yield from _ranked(op.query, where, wanted)
        kept = ranked[op.offset :]
        if len(kept) < op.limit:
            unindexed = [*where, {f"{_PLACE}.vector": False}]
            kept += yield from _listed(unindexed, op.limit - len(kept))
        return kept

    def _write(self, puts: list[PutOp]) -> Plan[None]:
        """Upsert the new records first, then delete what the old versions held beyond them,
        so an item is never missing while it is replaced."""
        ids = [_item_id(op.namespace, op.key) for op in puts]
        old = yield _Call("get_many", (ids,))
        old_parts = {hit.id: int(hit.metadata[_PLACE]["parts"]) for hit in old}
        records: list[dict[str, Any]] = []
        stale: list[str] = []
        for op, rid in zip(puts, ids, strict=True):
            kept = 0
            if op.value is not None:
                texts = self._texts(op)
                records += _records(op, rid, texts)
                kept = max(len(texts), 1)
            stale += [_part_id(rid, part) for part in range(kept, old_parts.get(rid, 0))]
        if records:
            yield _Call("add_many", (records,))
        if stale:
            yield _Call("delete_many", (stale,))

    def _texts(self, op: PutOp) -> list[str]:
        """The distinct non-blank texts the index fields (or the put's own) select."""
        if self._fields is None or op.index is False or op.value is None:
            return []
        paths = self._fields if op.index is None else op.index
        texts = (text for path in paths for text in get_text_at_path(op.value, path))
        return list(dict.fromkeys(text for text in texts if text.strip()))


def _embedder(embed: Any) -> Any:
    """`index["embed"]` as a memlayer embedder: names pass through, anything LangGraph takes
    is wrapped as `Embeddings` and embeds by `embed_documents`."""
    if embed is None or isinstance(embed, str):
        return embed
    return ensure_embeddings(embed).embed_documents


def _check(op: Op) -> list[dict[str, Any]]:
    """Refuse a bad op before anything runs, with LangGraph's own errors for namespaces;
    a search op's filter comes back as memlayer filter clauses."""
    if not isinstance(op, (GetOp, PutOp, SearchOp, ListNamespacesOp)):
        raise ValueError(f"Unknown operation type: {type(op)}")
    validate_op_namespace(op)
    if isinstance(op, PutOp):
        if not op.namespace:
            raise InvalidNamespaceError("Namespace cannot be empty.")
        if op.namespace[0] == "langgraph":
            raise InvalidNamespaceError(
                f'Root label for namespace cannot be "langgraph". Got: {op.namespace}'
            )
        if op.ttl is not None:
            raise NotImplementedError(
                "TTL is not supported by MemlayerStore. Use a store implementation that "
                "supports TTL or set ttl=None."
            )
        if op.value is not None and not isinstance(op.value, Mapping):
            raise InvalidInputError("value", "must be a dict, or None to delete", op.value)
    if isinstance(op, (GetOp, PutOp)) and not isinstance(op.key, str):
        raise InvalidInputError("key", "must be a string", op.key)
    if isinstance(op, (SearchOp, ListNamespacesOp)):
        _check_count("limit", op.limit, 0)
        _check_count("offset", op.offset, 0)
    if isinstance(op, SearchOp):
        return _where(op.filter)
    if isinstance(op, ListNamespacesOp):
        if op.max_depth is not None:
            _check_count("max_depth", op.max_depth, 1)
        for condition in op.match_conditions or ():
            if condition.match_type not in ("prefix", "suffix"):
                raise ValueError(f"Unsupported match type: {condition.match_type}")
    return []


def _check_count(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidInputError(name, f"must be an integer >= {least}", value)


def _where(filter: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """LangGraph's filter (exact match of fields, nested dicts matching nested fields, and
    `$eq $ne $gt $gte $lt $lte`) as memlayer filters on the stored value."""
    clauses: list[dict[str, Any]] = []

    def walk(path: list[str], condition: Any, name: str) -> None:
        if not isinstance(path[-1], str) or not path[-1] or set(path[-1]) & set('."\\'):
            raise InvalidInputError(name, 'field names must be non-empty, without . " or \\')
        if isinstance(condition, Mapping) and any(str(k).startswith("$") for k in condition):
            for op_name in condition:
                if op_name not in _OPERATORS:
                    raise InvalidInputError(
                        f"{name}.{op_name}", f"unknown operator; allowed: {', '.join(_OPERATORS)}"
                    )
            clauses.append({".".join(path): {k: _scalar(v, name) for k, v in condition.items()}})
        elif isinstance(condition, Mapping) and condition:
            for key, sub in condition.items():
                walk([*path, key], sub, f"{name}.{key}")
        else:
            clauses.append({".".join(path): {"$eq": _scalar(condition, name)}})

    for key, condition in (filter or {}).items():
        walk(["value", key], condition, f"filter.{key}")
    return clauses


def _scalar(value: Any, name: str) -> Any:
    if not isinstance(value, (str, int, float)):  # bool is an int
        raise InvalidInputError(name, "must compare to a string, a number or a boolean", value)
    return value


def _ranked(query: str, where: list[dict[str, Any]], wanted: int) -> Plan[list[SearchItem]]:
    """The `wanted` best items by their best part; the vector search widens until it has
    that many distinct items or the store has no more."""
    k = wanted
    while True:
        hits = yield _Call(
            "search", (query,), {"k": k, "filters": _all([*where, _VECTOR]), "mode": "vector"}
        )
        best: dict[str, Hit] = {}
        for hit in hits:
            best.setdefault(hit.metadata[_PLACE]["id"], hit)
        if len(best) >= wanted or len(hits) < k:
            break
        k *= 2
    winners = list(best.values())[:wanted]
    # a part's own timestamps are not the item's: read the item records of winning parts
    parts = [hit.metadata[_PLACE]["id"] for hit in winners if hit.metadata[_PLACE]["part"]]
    items = {hit.id: hit for hit in ((yield _Call("get_many", (parts,))) if parts else [])}
    return [_found(items.get(hit.metadata[_PLACE]["id"], hit), hit.score) for hit in winners]


def _listed(where: list[dict[str, Any]], wanted: int) -> Plan[list[SearchItem]]:
    """The first `wanted` items in `InMemoryStore`'s order: namespace by namespace in the
    order each first got an item, each namespace's items in the order they were first put."""
    items: list[SearchItem] = []
    seen: list[str] = []
    while len(items) < wanted:
        later = [{f"{_PLACE}.namespace": {"$nin": seen}}] if seen else []
        first = yield _Call("scan", (), {"filters": _all([*where, _ITEM, *later]), "limit": 1})
        if not first:
            break
        seen.append(first[0].metadata[_PLACE]["namespace"])
        here = {f"{_PLACE}.namespace": seen[-1]}
        hits = yield _Call(
            "scan", (), {"filters": _all([*where, _ITEM, here]), "limit": wanted - len(items)}
        )
        items += [_found(hit, None) for hit in hits]
    return items


def _list_namespaces(op: ListNamespacesOp) -> Plan[list[tuple[str, ...]]]:
    """Namespaces holding items that meet every condition, cut to `max_depth`, sorted.
    Reads one record per item under the conditions' fixed prefix labels."""
    conditions = op.match_conditions or ()
    where: list[dict[str, Any]] = [_ITEM]
    for condition in conditions:
        where.append({f"{_PLACE}.depth": {"$gte": len(condition.path)}})
        if condition.match_type == "prefix":
            where.append(_labels(condition.path))
    hits = yield _Call("scan", (), {"filters": _all(where)})
    namespaces = {_namespace(hit) for hit in hits}
    matching = {ns for ns in namespaces if all(_matches(c, ns) for c in conditions)}
    if op.max_depth is not None:
        matching = {ns[: op.max_depth] for ns in matching}
    return sorted(matching)[op.offset : op.offset + op.limit]


def _matches(condition: MatchCondition, namespace: tuple[str, ...]) -> bool:
    """A prefix or suffix condition, `*` matching any one label."""
    path = tuple(condition.path)
    if len(namespace) < len(path):
        return False
    end = namespace[: len(path)] if condition.match_type == "prefix" else namespace[-len(path) :]
    return all(want in ("*", got) for want, got in zip(path, end, strict=True))


def _labels(prefix: Sequence[str]) -> dict[str, Any]:
    """Filter on the namespace's leading labels (`*` matches any label)."""
    return {f"{_PLACE}.labels.{i}": label for i, label in enumerate(prefix) if label != "*"}


def _all(clauses: list[dict[str, Any]]) -> dict[str, Any]:
    """One memlayer filter from clauses (each plan's clauses include a non-empty one)."""
    kept = [clause for clause in clauses if clause]
    return kept[0] if len(kept) == 1 else {"$and": kept}


def _records(op: PutOp, rid: str, texts: list[str]) -> list[dict[str, Any]]:
    """The records of one item: the item record, then one part per further indexed text.
    An unindexed item's text is its path, which no vector search looks at."""
    assert op.value is not None
    namespace = ".".join(op.namespace)
    parts = max(len(texts), 1)
    place = {
        "id": rid,
        "namespace": namespace,
        "labels": {str(i): label for i, label in enumerate(op.namespace)},
        "depth": len(op.namespace),
        "key": op.key,
        "parts": parts,
        "vector": bool(texts),
    }
    value = dict(op.value)
    fallback = f"{namespace}/{op.key}"
    return [
        {
            "id": _part_id(rid, part),
            "text": texts[part] if texts else fallback,
            "metadata": {_PLACE: {**place, "part": part}, "value": value},
        }
        for part in range(parts)
    ]


def _item_id(namespace: tuple[str, ...], key: str) -> str:
    """A record id for (namespace, key): fixed length whatever their size."""
    digest = hashlib.sha256(json.dumps([list(namespace), key]).encode()).hexdigest()
    return f"lg-{digest[:40]}"


def _part_id(rid: str, part: int) -> str:
    return rid if part == 0 else f"{rid}#{part}"


def _namespace(hit: Hit) -> tuple[str, ...]:
    return tuple(hit.metadata[_PLACE]["namespace"].split("."))  # labels hold no period


def _item(hit: Hit) -> Item:
    """The item an item record holds."""
    return Item(
        value=hit.metadata["value"],
        key=hit.metadata[_PLACE]["key"],
        namespace=_namespace(hit),
        created_at=_time(hit.created_at),
        updated_at=_time(hit.updated_at),
    )


def _found(hit: Hit, score: float | None) -> SearchItem:
    """A search result: the item record's item, with the score its best part earned."""
    item = _item(hit)
    return SearchItem(item.namespace, item.key, item.value, item.created_at, item.updated_at, score)


def _time(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=timezone.utc)
