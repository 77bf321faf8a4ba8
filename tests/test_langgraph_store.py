"""`MemlayerStore`, memlayer as LangGraph's long-term store: the same script of calls gives
what LangGraph's own `InMemoryStore` gives (sync and async, with and without an index),
tenants stay apart, a reopened folder keeps its items, and bad input is refused like
LangGraph refuses it, changing nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langgraph.store.base import (
    BaseStore,
    IndexConfig,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    PutOp,
    SearchItem,
    SearchOp,
)
from langgraph.store.memory import InMemoryStore

from memlayer import AsyncMemory, InvalidInputError, Memory
from memlayer.embedders import HashEmbedder
from memlayer.integrations.langchain import MemlayerStore

DIM = 64
_HASH = HashEmbedder(DIM)


def embed(texts: Sequence[str]) -> list[list[float]]:
    """memlayer's hash embedder (texts sharing words get similar vectors) plus a small fixed
    jitter per text, so different texts never tie on a score and rankings are comparable.
    Both stores embed with it."""
    jitter = [np.random.default_rng(list(text.encode())).normal(0, 0.05, DIM) for text in texts]
    return (_HASH.embed(texts) + np.array(jitter)).tolist()


# One step: (method, positional args, keyword args). Puts, overwrites and deletes come
# between the reads so each read sees a different state. The script keeps clear of three
# InMemoryStore quirks that a persistent store does not copy: a `get` in a namespace that
# never held an item lists that namespace, a namespace stays listed after its last item is
# deleted, and an overwrite keeps the old version's vectors.
Step = tuple[str, tuple[Any, ...], dict[str, Any]]

SCRIPT: list[Step] = [
    (
        "put",
        (
            ("users", "ada", "prefs"),
            "seat",
            {
                "text": "window seat on long flights",
                "kind": "pref",
                "n": 3,
                "meta": {"lang": "en"},
                "tags": ["travel", "flights"],
            },
        ),
        {},
    ),
    (
        "put",
        (
            ("users", "ada", "prefs"),
            "food",
            {
                "text": "vegetarian pasta dinner",
                "kind": "pref",
                "n": 1,
                "meta": {"lang": "it"},
                "tags": ["food"],
            },
        ),
        {},
    ),
    (
        "put",
        (
            ("users", "bob", "prefs"),
            "seat",
            {"text": "aisle seat near the front", "kind": "pref", "n": 5, "meta": {"lang": "en"}},
        ),
        {},
    ),
    (
        "put",
        (
            ("users", "ada", "notes"),
            "trip",
            {"text": "flights to Lisbon in May", "kind": "note", "n": 2, "tags": ["travel"]},
        ),
        {},
    ),
    ("put", (("docs",), "guide", {"text": "how to book long flights", "kind": "doc", "n": 4}), {}),
    ("put", (("docs", "v1"), "old", {"text": "legacy booking guide", "kind": "doc", "n": 0}), {}),
    ("put", (("a", "b", "c"), "x", {"text": "deep one", "n": 7}), {}),
    ("put", (("a", "b", "d", "e"), "y", {"text": "deeper two", "n": 8}), {}),
    ("put", (("a", "c", "f"), "z", {"text": "other branch", "n": 9}), {}),
    ("get", (("users", "ada", "prefs"), "seat"), {}),
    ("get", (("users", "ada", "prefs"), "missing"), {}),
    ("search", (("users",),), {}),
    ("search", ((),), {"limit": 3, "offset": 2}),
    ("search", (("users", "ada"),), {"filter": {"kind": "pref"}}),
    ("search", ((),), {"filter": {"n": {"$gt": 2}}}),
    ("search", ((),), {"filter": {"n": {"$gte": 1, "$lte": 4}, "kind": {"$ne": "note"}}}),
    ("search", ((),), {"filter": {"n": {"$lt": 2}}}),
    ("search", ((),), {"filter": {"meta": {"lang": "en"}}}),
    ("search", ((),), {"filter": {"kind": {"$eq": "doc"}}, "limit": 1, "offset": 1}),
    ("search", (("users",),), {"query": "long flights seat"}),
    ("search", ((),), {"query": "booking flights", "limit": 3}),
    ("search", ((),), {"query": "booking flights", "limit": 2, "offset": 2}),
    ("search", ((),), {"query": "seat", "filter": {"kind": "pref"}, "limit": 2}),
    ("search", (("users", "ada", "prefs"),), {"query": "food travel"}),
    ("search", (("nowhere",),), {"query": "anything"}),
    # overwrite, delete, re-put: the order listings give must follow
    (
        "put",
        (
            ("users", "ada", "prefs"),
            "food",
            {"text": "vegan ramen lunch", "kind": "pref", "n": 6, "tags": ["food"]},
        ),
        {},
    ),
    ("delete", (("users", "ada", "prefs"), "seat"), {}),
    (
        "put",
        (("users", "ada", "prefs"), "seat", {"text": "exit row seat", "kind": "pref", "n": 4}),
        {},
    ),
    (
        "put",
        (("users", "carol"), "unindexed", {"text": "ramen lunch plans", "kind": "pref", "n": 2}),
        {"index": False},
    ),
    (
        "put",
        (
            ("users", "carol"),
            "own-fields",
            {"text": "ignored", "other": "ramen lunch plans", "kind": "pref", "n": 2},
        ),
        {"index": ["other"]},
    ),
    (
        "put",
        (("users", "carol"), "no-text", {"title": "nothing to embed here", "kind": "pref", "n": 3}),
        {},
    ),
    ("get", (("users", "ada", "prefs"), "seat"), {}),
    ("get", (("users", "ada", "prefs"), "food"), {}),
    ("search", (("users",),), {}),
    ("search", (("users", "ada", "prefs"),), {"limit": 1, "offset": 1}),
    ("search", (("users",),), {"query": "ramen lunch"}),
    ("search", (("users",),), {"query": "ramen lunch", "limit": 2, "offset": 3}),
    ("search", (("users",),), {"query": "ramen lunch", "filter": {"kind": "pref"}, "limit": 7}),
    ("search", (("users",),), {"query": "exit row", "limit": 0}),
    ("list_namespaces", (), {}),
    ("list_namespaces", (), {"prefix": ("users",)}),
    ("list_namespaces", (), {"suffix": ("prefs",)}),
    ("list_namespaces", (), {"prefix": ("users", "*", "prefs")}),
    ("list_namespaces", (), {"prefix": ("a", "*"), "suffix": ("*", "c")}),
    ("list_namespaces", (), {"suffix": ("b", "*")}),
    ("list_namespaces", (), {"max_depth": 2}),
    ("list_namespaces", (), {"prefix": ("a",), "max_depth": 3}),
    ("list_namespaces", (), {"limit": 2, "offset": 1}),
    ("list_namespaces", (), {"prefix": ("missing",)}),
]

INDEXES: dict[str, IndexConfig | None] = {
    "no index": None,
    "index on text": IndexConfig(dims=DIM, embed=embed, fields=["text"]),
    "index on text and tags": IndexConfig(dims=DIM, embed=embed, fields=["text", "tags[*]"]),
    "index on the whole value": IndexConfig(dims=DIM, embed=embed),
}


def _store_pair(index: IndexConfig | None, where: dict) -> tuple[BaseStore, MemlayerStore]:
    """InMemoryStore and MemlayerStore with one config, on a backend's location; without an
    index memlayer still needs an embedder, so the no-index store gets a hash-embedder
    Memory."""
    reference = InMemoryStore(index=index)
    if index is None:
        return reference, MemlayerStore(Memory(**where, embedder="hash"))
    return reference, MemlayerStore(**where, index=index)


def _seen(result: Any, scores: list[float | None]) -> Any:
    """A result as comparable data (items as dicts), its search scores moved to `scores`."""
    if isinstance(result, list):
        return [_seen(entry, scores) for entry in result]
    if isinstance(result, SearchItem):
        scores.append(result.score)
    if isinstance(result, Item):
        return {"namespace": result.namespace, "key": result.key, "value": result.value}
    return result


def _same(mine: Any, theirs: Any, where: str) -> None:
    """Equal results, in the same order, with scores equal within float32 tolerance."""
    my_scores: list[float | None] = []
    their_scores: list[float | None] = []
    assert _seen(mine, my_scores) == _seen(theirs, their_scores), where
    assert my_scores == pytest.approx(their_scores, abs=1e-5), where


def _check_times(result: Any) -> None:
    for item in result if isinstance(result, list) else [result]:
        if isinstance(item, Item):
            assert item.created_at.tzinfo is not None and item.updated_at.tzinfo is not None
            assert item.created_at <= item.updated_at


@pytest.mark.parametrize("index", INDEXES.values(), ids=INDEXES.keys())
def test_same_script_gives_what_inmemorystore_gives(index: Any, memory_location: dict) -> None:
    """On both backends: a SQLite folder and PostgreSQL with pgvector."""
    reference, store = _store_pair(index, memory_location)
    for number, (method, args, kwargs) in enumerate(SCRIPT):
        theirs = getattr(reference, method)(*args, **kwargs)
        mine = getattr(store, method)(*args, **kwargs)
        _check_times(mine)
        _same(mine, theirs, f"step {number}: {method}{args} {kwargs}")
    store.close()


@pytest.mark.parametrize("index", INDEXES.values(), ids=INDEXES.keys())
def test_same_script_async_gives_what_inmemorystore_gives(index: Any, tmp_path: Path) -> None:
    reference, store = _store_pair(index, {"path": tmp_path})

    async def run() -> None:
        for number, (method, args, kwargs) in enumerate(SCRIPT):
            theirs = await getattr(reference, f"a{method}")(*args, **kwargs)
            mine = await getattr(store, f"a{method}")(*args, **kwargs)
            _same(mine, theirs, f"step {number}: a{method}{args} {kwargs}")

    asyncio.run(run())
    store.close()


def test_abatch_awaits_the_async_memory(tmp_path: Path) -> None:
    """The async path awaits AsyncMemory's own methods (not the sync batch in a thread)."""
    memory = AsyncMemory.wrap(Memory(path=tmp_path, embedder="hash"))
    awaited: list[str] = []
    for name in ("get_many", "add_many", "delete_many", "search", "scan"):
        setattr(memory, name, _spy(getattr(memory, name), awaited))
    store = MemlayerStore(memory, index={"fields": ["text"]})

    async def run() -> None:
        await store.aput(("docs",), "a", {"text": "red apples"})
        assert (await store.aget(("docs",), "a")) is not None
        assert [hit.key for hit in await store.asearch(("docs",), query="apples")] == ["a"]
        assert await store.alist_namespaces() == [("docs",)]
        await store.adelete(("docs",), "a")

    asyncio.run(run())
    # put: old versions, upsert; get; search: ranked, then unindexed fill; list; delete
    expected = ["get_many", "add_many", "get_many", "search", "scan", "scan", "get_many"]
    assert awaited == [*expected, "delete_many"]


def _spy(method: Callable[..., Any], awaited: list[str]) -> Callable[..., Any]:
    async def spy(*args: Any, **kwargs: Any) -> Any:
        awaited.append(method.__name__)
        return await method(*args, **kwargs)

    return spy


def test_tenants_on_one_memory_never_see_each_other(tmp_path: Path) -> None:
    memory = Memory(path=tmp_path, embedder="hash")
    acme = MemlayerStore(memory, index={"fields": ["text"]}, tenant_id="acme")
    globex = MemlayerStore(memory, index={"fields": ["text"]}, tenant_id="globex")
    acme.put(("users", "ada"), "seat", {"text": "window seat", "who": "acme"})
    globex.put(("users", "ada"), "seat", {"text": "aisle seat", "who": "globex"})
    globex.put(("users", "bob"), "food", {"text": "pasta", "who": "globex"})

    assert _value(acme, ("users", "ada"), "seat") == {"text": "window seat", "who": "acme"}
    assert acme.get(("users", "bob"), "food") is None
    for query in (None, "seat pasta"):
        found = acme.search(("users",), query=query)
        assert [item.value["who"] for item in found] == ["acme"]
    assert acme.search((), filter={"who": "globex"}) == []
    assert acme.list_namespaces() == [("users", "ada")]
    acme.delete(("users", "ada"), "seat")
    assert _value(globex, ("users", "ada"), "seat") == {"text": "aisle seat", "who": "globex"}
    assert len(globex.search(("users",), query="seat")) == 2


def _value(store: BaseStore, namespace: tuple[str, ...], key: str) -> Any:
    item = store.get(namespace, key)
    return item.value if item is not None else None


def test_reopened_folder_keeps_items(tmp_path: Path) -> None:
    index = IndexConfig(dims=DIM, embed=embed, fields=["text"])
    store = MemlayerStore(path=tmp_path, index=index)
    store.put(("users", "ada"), "seat", {"text": "window seat on long flights"})
    store.put(("users", "ada"), "food", {"text": "vegetarian pasta"})
    before = store.search(("users",), query="long flights")
    store.close()

    reopened = MemlayerStore(path=tmp_path, index=index)
    item = reopened.get(("users", "ada"), "seat")
    assert item is not None and item.value == {"text": "window seat on long flights"}
    after = reopened.search(("users",), query="long flights")
    assert [(i.key, i.score, i.created_at) for i in after] == [
        (i.key, i.score, i.created_at) for i in before
    ]
    assert reopened.list_namespaces() == [("users", "ada")]
    reopened.close()


def test_overwrite_keeps_created_at_and_drops_stale_parts(tmp_path: Path) -> None:
    """An item with several indexed texts is several records; an overwrite with fewer
    texts, or a delete, leaves none of the old ones behind, and a hit on any text reports
    the item's timestamps. Like PostgresStore (unlike InMemoryStore), an overwrite keeps
    the item's created_at."""
    memory = Memory(path=tmp_path, embedder="hash")
    store = MemlayerStore(memory, index={"fields": ["tags[*]"]})
    store.put(("docs",), "a", {"tags": ["yellow bananas"]})
    first = store.get(("docs",), "a")
    store.put(("docs",), "a", {"tags": ["red apples", "green pears", "blue plums"]})
    second = store.get(("docs",), "a")
    assert first is not None and second is not None and memory.count() == 3
    assert second.created_at == first.created_at and second.updated_at > first.updated_at
    [hit] = store.search(("docs",), query="green pears", limit=1)
    assert hit.score == pytest.approx(1.0, abs=1e-5)
    assert (hit.created_at, hit.updated_at) == (second.created_at, second.updated_at)

    store.put(("docs",), "a", {"tags": ["yellow bananas"]})
    assert memory.count() == 1
    assert (store.search(("docs",), query="green pears")[0].score or 0.0) < 0.5

    store.delete(("docs",), "a")
    assert memory.count() == 0 and store.get(("docs",), "a") is None


def test_namespaces_are_listed_while_they_hold_items(tmp_path: Path) -> None:
    """A persistent store lists what it holds: a read of an unknown namespace lists
    nothing, and a namespace whose last item is deleted is gone (InMemoryStore lists both)."""
    store = MemlayerStore(Memory(path=tmp_path, embedder="hash"))
    assert store.get(("ghost",), "k") is None
    store.put(("users", "ada"), "k", {"v": 1})
    assert store.list_namespaces() == [("users", "ada")]
    store.delete(("users", "ada"), "k")
    assert store.list_namespaces() == []


def _bad_calls() -> list[tuple[str, Callable[[BaseStore], Any]]]:
    return [
        ("empty namespace", lambda s: s.put((), "k", {"v": 1})),
        ("period in a label", lambda s: s.put(("a.b",), "k", {"v": 1})),
        ("empty label", lambda s: s.put(("a", ""), "k", {"v": 1})),
        ("langgraph root", lambda s: s.put(("langgraph", "x"), "k", {"v": 1})),
        ("period in get", lambda s: s.get(("a.b",), "k")),
        ("period in search", lambda s: s.search(("a.b",))),
        ("period in delete", lambda s: s.delete(("a.b",), "k")),
        ("period in prefix", lambda s: s.list_namespaces(prefix=("a.b",))),
        ("non-string label", lambda s: s.search(("a", 1))),
        ("ttl", lambda s: s.put(("a",), "k", {"v": 1}, ttl=5)),
    ]


@pytest.mark.parametrize(("name", "call"), _bad_calls(), ids=[n for n, _ in _bad_calls()])
def test_bad_input_is_refused_as_langgraph_refuses_it(
    name: str, call: Callable[[BaseStore], Any], tmp_path: Path
) -> None:
    memory = Memory(path=tmp_path, embedder="hash")
    mine, theirs = MemlayerStore(memory), InMemoryStore()
    with pytest.raises(Exception) as expected:
        call(theirs)
    with pytest.raises(expected.type):
        call(mine)
    assert memory.count() == 0


@pytest.mark.parametrize(
    ("op", "error"),
    [
        (PutOp(("a.b",), "k", {"v": 1}), InvalidNamespaceError),
        (PutOp((), "k", {"v": 1}), InvalidNamespaceError),
        (PutOp(("a",), "k", {"v": 1}, ttl=5), NotImplementedError),
        (PutOp(("a",), "k", ["not", "a", "dict"]), InvalidInputError),  # type: ignore[arg-type]
        (SearchOp(("a",), {"tags": ["x"]}), InvalidInputError),
        (SearchOp(("a",), {"v": None}), InvalidInputError),
        (SearchOp(("a",), {"v": {"$in": [1]}}), InvalidInputError),
        (SearchOp(("a",), {"a.b": 1}), InvalidInputError),
        (SearchOp(("a",), limit=-1), InvalidInputError),
        (ListNamespacesOp(max_depth=0), InvalidInputError),
    ],
    ids=str,
)
def test_a_bad_op_in_a_batch_changes_nothing(op: Any, error: type, tmp_path: Path) -> None:
    """Ops handed to batch directly are checked too, all before any is run."""
    memory = Memory(path=tmp_path, embedder="hash")
    store = MemlayerStore(memory)
    with pytest.raises(error):
        store.batch([PutOp(("ok",), "k", {"v": 1}), op])
    with pytest.raises(error):
        asyncio.run(store.abatch([PutOp(("ok",), "k", {"v": 1}), op]))
    assert memory.count() == 0 and store.list_namespaces() == []


def test_store_configuration_is_checked(tmp_path: Path) -> None:
    memory = Memory(path=tmp_path / "m", embedder="hash")
    with pytest.raises(InvalidInputError, match=r"index\.embed"):
        MemlayerStore(memory, index=IndexConfig(embed=embed))
    with pytest.raises(InvalidInputError, match="path"):
        MemlayerStore(memory, path=tmp_path / "other")
    with pytest.raises(InvalidInputError, match=r"index\.dims"):
        MemlayerStore(memory, index={"dims": DIM + 1})
    with pytest.raises(InvalidInputError, match="tenant_id"):
        MemlayerStore(memory, tenant_id="")
