"""The Memory API as an agent uses it: round trips, upserts, deletes, scopes, exact k, errors."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from memlayer import (
    AsyncMemory,
    ClosedError,
    InvalidInputError,
    Memory,
    ModelMismatchError,
    NotFoundError,
)


@pytest.fixture
def memory(open_memory: Callable[..., Memory]) -> Iterator[Memory]:
    with open_memory(embedder="hash") as mem:
        yield mem


def test_round_trip_survives_reopen(open_memory: Callable[..., Memory]) -> None:
    with open_memory(embedder="hash") as mem:
        rid = mem.add("The user prefers window seats.", metadata={"kind": "pref"}, user_id="ada")
        mem.add("Lunch is at noon.", user_id="ada")
    with open_memory(embedder="hash") as mem:
        hit = mem.get(rid)
        assert hit is not None
        assert hit.text == "The user prefers window seats."
        assert hit.metadata == {"kind": "pref"}
        assert hit.scope.user_id == "ada"
        assert mem.search("window seats", k=1, user_id="ada")[0].id == rid
        assert mem.count(user_id="ada") == 2


def test_stale_index_is_rebuilt_from_the_database(tmp_path: Path) -> None:
    folder = tmp_path / "mem"
    with Memory(path=folder, embedder="hash") as mem:
        first = mem.add("alpha beta gamma")
    with Memory(path=folder, embedder="hash") as mem:
        second = mem.add("delta epsilon zeta")
        mem._dirty = False  # simulate a crash before the index was saved
    with Memory(path=folder, embedder="hash") as mem:
        ids = {hit.id for hit in mem.search("epsilon zeta", k=2, mode="vector")}
        assert ids == {first, second}


def test_corrupt_index_file_is_rebuilt(tmp_path: Path) -> None:
    folder = tmp_path / "mem"
    with Memory(path=folder, embedder="hash") as mem:
        rid = mem.add("remember the milk")
    (folder / "vectors.idx").write_bytes(b"garbage")
    with Memory(path=folder, embedder="hash") as mem:
        assert mem.search("milk", k=1, mode="vector")[0].id == rid


def test_add_with_existing_id_updates(memory: Memory) -> None:
    memory.add("first version", id="note-1")
    memory.add("second version", id="note-1", metadata={"v": 2})
    assert memory.count() == 1
    hit = memory.get("note-1")
    assert hit is not None and hit.text == "second version" and hit.metadata == {"v": 2}
    assert [h.id for h in memory.search("second version", k=5)] == ["note-1"]


def test_update_changes_text_and_metadata(memory: Memory) -> None:
    rid = memory.add("the cat sat on the mat")
    memory.update(rid, text="quantum chromodynamics lecture", metadata={"topic": "physics"})
    hit = memory.search("quantum chromodynamics", k=1, mode="keyword")[0]
    assert hit.id == rid and hit.metadata == {"topic": "physics"}
    assert memory.search("cat mat", k=5, mode="keyword") == []
    with pytest.raises(NotFoundError):
        memory.update("missing", text="x")


def test_delete_removes_from_every_search_mode(memory: Memory) -> None:
    keep = memory.add("apples and pears")
    gone = memory.add("apples and oranges")
    memory.delete(gone)
    for mode in ("vector", "keyword", "hybrid"):
        assert [h.id for h in memory.search("apples oranges", k=5, mode=mode)] == [keep]
    assert memory.get(gone) is None
    with pytest.raises(NotFoundError):
        memory.delete(gone)


def test_delete_scope_only_touches_that_scope(memory: Memory) -> None:
    memory.add_many(["a one", "a two"], tenant_id="A")
    memory.add("b one", tenant_id="B")
    assert memory.delete_scope(tenant_id="A") == 2
    assert memory.count(tenant_id="A") == 0
    assert memory.count(tenant_id="B") == 1
    with pytest.raises(InvalidInputError, match="scope"):
        memory.delete_scope()


def test_tenants_never_see_each_other(memory: Memory) -> None:
    rng = random.Random(7)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
    ]
    owner: dict[str, str] = {}
    for tenant in ("A", "B", "C"):
        texts = [" ".join(rng.choices(words, k=6)) for _ in range(60)]
        for rid in memory.add_many(texts, tenant_id=tenant, user_id=f"u{rng.randint(0, 2)}"):
            owner[rid] = tenant
    for _ in range(30):
        query = " ".join(rng.choices(words, k=3))
        tenant = rng.choice("ABC")
        for mode in ("vector", "keyword", "hybrid"):
            hits = memory.search(query, k=10, mode=mode, tenant_id=tenant)
            assert hits and all(owner[h.id] == tenant for h in hits)
            assert all(h.scope.tenant_id == tenant for h in hits)


def test_exactly_k_under_a_selective_filter(memory: Memory) -> None:
    items = [
        {"text": f"common words record {i}", "metadata": {"rare": i % 50 == 0, "i": i}}
        for i in range(400)
    ]
    memory.add_many(items)
    hits = memory.search("common words", k=5, mode="vector", filters={"rare": True})
    assert len(hits) == 5
    assert all(h.metadata["rare"] is True for h in hits)
    hits = memory.search("common words", k=50, mode="hybrid", filters={"i": {"$lt": 7}})
    assert sorted(h.metadata["i"] for h in hits) == list(range(7))


def test_exactly_k_when_enough_records_exist(memory: Memory) -> None:
    memory.add_many([f"note number {i}" for i in range(30)], session_id="s")
    for mode in ("vector", "hybrid"):
        assert len(memory.search("unrelated query text", k=12, mode=mode, session_id="s")) == 12


def test_context_respects_the_budget_and_names_ids(memory: Memory) -> None:
    ids = memory.add_many([f"fact {i}: the sky is blue and grass is green" for i in range(10)])
    context = memory.context("sky blue", budget_tokens=40)
    assert 0 < context.tokens <= 40
    assert context.ids and set(context.ids) <= set(ids)
    assert all(f"[{rid}]" in context.text for rid in context.ids)


def test_ingest_chunks_a_lazy_stream(memory: Memory) -> None:
    def pieces():
        for i in range(200):
            yield f"sentence {i} about the ocean. "

    stored = memory.ingest(pieces(), metadata={"source": "gen"}, progress=False, agent_id="bot")
    assert stored == memory.count(agent_id="bot") > 1
    hit = memory.search("sentence 150", k=1, mode="keyword", agent_id="bot")[0]
    assert "150" in hit.text and hit.metadata["source"] == "gen"


def test_bulk_add_stores_a_load_batch_by_batch_and_in_order(memory: Memory) -> None:
    items = [
        {"text": f"note {i} about harbours", "id": f"n{i}", "metadata": {"i": i}}
        for i in range(2500)
    ]
    ids = memory.bulk_add(iter(items), batch_size=1000, progress=False, user_id="u")
    assert ids == [f"n{i}" for i in range(2500)]
    assert memory.count(user_id="u") == 2500
    assert memory.get("n1234", user_id="u").metadata == {"i": 1234}
    assert memory.search("note 17 about harbours", k=1, user_id="u")[0].id == "n17"
    assert memory.count(filters={"i": {"$in": [3, 2400]}}, user_id="u") == 2


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda m: m.add(""), "text"),
        (lambda m: m.add("   "), "text"),
        (lambda m: m.add(42), "text"),
        (lambda m: m.add("x", metadata={"bad": object()}), "metadata"),
        (lambda m: m.add("x", tenant_id=""), "tenant_id"),
        (lambda m: m.add("x", team_id="t"), "team_id"),
        (lambda m: m.search("q", k=0), "k"),
        (lambda m: m.search("q", mode="fuzzy"), "mode"),
        (lambda m: m.search("q", filters={"a": {"$regex": "x"}}), "filters.a.$regex"),
        (lambda m: m.search("q", filters={"$nor": []}), "filters.$nor"),
        (lambda m: m.search("q", filters={"$and": {}}), "filters.$and"),
        (lambda m: m.search("q", filters={"a": {"$gt": [1]}}), "filters.a.$gt"),
        (lambda m: m.context("q", budget_tokens=0), "budget_tokens"),
        (lambda m: m.bulk_add(["ok"] * 3 + [""], progress=False), "items[3]"),
        (lambda m: m.bulk_add([{"text": "a", "id": "x"}] * 2, progress=False), "items"),
        (lambda m: m.bulk_add(["ok"], batch_size=0), "batch_size"),
    ],
)
def test_bad_input_names_the_field_and_changes_nothing(memory: Memory, call, field: str) -> None:
    memory.add("existing record")
    with pytest.raises(InvalidInputError) as info:
        call(memory)
    assert info.value.field == field
    assert str(info.value).startswith(field)
    assert memory.count() == 1


def test_embedder_with_wrong_dimension_is_rejected(open_memory: Callable[..., Memory]) -> None:
    calls = {"n": 0}

    def broken(texts: list[str]) -> np.ndarray:
        calls["n"] += 1
        dim = 8 if calls["n"] == 1 else 5
        return np.ones((len(texts), dim), dtype=np.float32)

    with open_memory(embedder=broken) as mem:
        with pytest.raises(InvalidInputError, match="embedder"):
            mem.add("hello")
        assert mem.count() == 0


def test_reopening_with_another_dimension_is_rejected(open_memory: Callable[..., Memory]) -> None:
    open_memory(embedder="hash-64").close()
    with pytest.raises(InvalidInputError, match="embedder"):
        open_memory(embedder="hash-32")


def test_reopening_with_another_embedder_of_the_same_width_is_rejected(
    open_memory: Callable[..., Memory],
) -> None:
    with open_memory(embedder="hash-64") as memory:
        memory.add("kept under the hashing embedder")

    def other(texts: list[str]) -> np.ndarray:
        return np.ones((len(texts), 64), dtype=np.float32)

    with pytest.raises(ModelMismatchError, match="hash-64"):
        open_memory(embedder=other)
    with open_memory(embedder="hash-64") as memory:
        assert memory.count() == 1


def test_path_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("not a folder")
    with pytest.raises(InvalidInputError, match="path"):
        Memory(path=target, embedder="hash")


def test_database_url_as_path_is_rejected_before_any_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInputError, match=r"path: is a database URL; pass it as Memory\(url"):
        Memory("postgresql+psycopg://user@localhost/db", embedder="hash")
    assert list(tmp_path.iterdir()) == []


def test_closed_memory_refuses_calls(open_memory: Callable[..., Memory]) -> None:
    mem = open_memory(embedder="hash")
    mem.close()
    with pytest.raises(ClosedError):
        mem.add("late")
    with pytest.raises(ClosedError):
        mem.search("late")


def test_default_path_is_the_user_data_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEMLAYER_DATA_DIR", str(tmp_path / "data"))
    with Memory(embedder="hash") as mem:
        mem.add("stored in the default place")
    assert (tmp_path / "data" / "memory.db").is_file()


def test_async_twin(memory_location: dict) -> None:
    async def scenario() -> None:
        async with AsyncMemory(**memory_location, embedder="hash") as mem:
            ids = await asyncio.gather(*(mem.add(f"async note {i}", user_id="u") for i in range(8)))
            assert len(set(ids)) == 8
            assert await mem.count(user_id="u") == 8
            hits = await mem.search("async note 3", k=3, user_id="u")
            assert len(hits) == 3
            await mem.update(ids[0], metadata={"seen": True})
            assert (await mem.get(ids[0])).metadata == {"seen": True}
            await mem.delete(ids[1])
            assert await mem.count(user_id="u") == 7
            assert await mem.bulk_add(["bulk a", "bulk b"], progress=False, user_id="v") == [
                h.id for h in await mem.scan(user_id="v")
            ]

    asyncio.run(scenario())


def test_environment_names_the_database_and_the_embedder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEMLAYER_URL", f"sqlite:///{tmp_path / 'env.db'}")
    monkeypatch.setenv("MEMLAYER_EMBEDDER", "hash-32")
    with Memory() as mem:
        mem.add("configured by the environment")
        assert mem.embedder.dim == 32 and mem.path is None
    assert (tmp_path / "env.db").is_file()
    with Memory(path=tmp_path / "folder", embedder="hash-16") as mem:  # arguments win
        assert mem.embedder.dim == 16 and mem.path == tmp_path / "folder"


def test_unknown_embedder_name_lists_the_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="embedder: must be a name") as info:
        Memory(path=tmp_path / "m", embedder="hash-wide")
    assert info.value.field == "embedder"
