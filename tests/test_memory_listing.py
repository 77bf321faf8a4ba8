"""The by-id batch calls, listing and search by vector that integrations build on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from memlayer import AsyncMemory, InvalidInputError, Memory


@pytest.fixture
def memory(open_memory: Callable[..., Memory]) -> Iterator[Memory]:
    with open_memory(embedder="hash") as mem:
        mem.add("apples are red", id="a", user_id="ada")
        mem.add("bananas are yellow", id="b", user_id="ada")
        mem.add("cherries are dark red", id="c", user_id="bob")
        mem.add("secret plans", id="a", tenant_id="other")
        yield mem


def test_scan_lists_oldest_first_and_a_replaced_record_keeps_its_place(memory: Memory) -> None:
    memory.add("apples are green now", id="a", user_id="ada")
    hits = memory.scan(user_id="ada")
    assert [(h.id, h.text) for h in hits] == [
        ("a", "apples are green now"),
        ("b", "bananas are yellow"),
    ]
    assert hits[0].updated_at > hits[0].created_at
    assert [h.id for h in memory.scan()] == ["a", "b", "c"]
    assert [h.id for h in memory.scan(limit=2)] == ["a", "b"]
    assert [h.text for h in memory.scan(tenant_id="other")] == ["secret plans"]


def test_scan_applies_filters_and_refuses_a_bad_limit(memory: Memory) -> None:
    memory.add("dates are sweet", id="d", user_id="ada", metadata={"kind": "fruit"})
    assert [h.id for h in memory.scan(filters={"kind": "fruit"})] == ["d"]
    with pytest.raises(InvalidInputError) as error:
        memory.scan(limit=-1)
    assert error.value.field == "limit"


def test_scan_pages_by_offset_and_limit(memory: Memory) -> None:
    memory.add_many([f"fruit {n}" for n in range(7)], user_id="cy")
    whole = [h.id for h in memory.scan(user_id="cy")]
    pages = [memory.scan(user_id="cy", offset=start, limit=3) for start in (0, 3, 6, 9)]
    assert [[h.id for h in page] for page in pages] == [whole[0:3], whole[3:6], whole[6:], []]
    assert [h.id for h in memory.scan(user_id="cy", offset=5)] == whole[5:]
    with pytest.raises(InvalidInputError) as error:
        memory.scan(offset=-1)
    assert error.value.field == "offset"


def test_get_many_keeps_the_order_asked_and_sees_only_its_scope(memory: Memory) -> None:
    assert [h.id for h in memory.get_many(["b", "missing", "a", "b"], user_id="ada")] == ["b", "a"]
    assert [h.id for h in memory.get_many(["a", "c"], user_id="ada")] == ["a"]
    assert [h.text for h in memory.get_many(["a"], tenant_id="other")] == ["secret plans"]
    assert memory.get_many([]) == []


def test_delete_many_skips_missing_ids_and_other_tenants(memory: Memory) -> None:
    assert memory.delete_many(["a", "c", "missing"], user_id="ada") == 1
    assert [h.id for h in memory.scan()] == ["b", "c"]
    assert memory.get("a", tenant_id="other") is not None
    assert memory.search("apples", k=5, mode="vector") and all(
        h.id != "a" for h in memory.search("apples", k=5, mode="vector")
    )


@pytest.mark.parametrize("ids", ["a", 7, None])
def test_batch_calls_refuse_a_single_id(memory: Memory, ids: object) -> None:
    for call in (memory.get_many, memory.delete_many):
        with pytest.raises(InvalidInputError) as error:
            call(ids)  # type: ignore[operator]
        assert error.value.field == "ids"
    assert memory.count() == 3


def test_search_by_vector_matches_vector_search_of_the_same_text(memory: Memory) -> None:
    vector = memory.embedder.embed(["dark red cherries"])[0] * 7.0
    by_vector = memory.search_by_vector(vector, k=3)
    by_text = memory.search("dark red cherries", k=3, mode="vector")
    assert [h.id for h in by_vector] == [h.id for h in by_text] == ["c", "a", "b"]
    assert [h.score for h in by_vector] == pytest.approx([h.score for h in by_text], abs=1e-6)
    scoped = memory.search_by_vector(list(vector), k=3, user_id="bob")
    assert [h.id for h in scoped] == ["c"]


@pytest.mark.parametrize("mode", ["vector", "hybrid", "keyword"])
def test_a_filtered_search_of_an_empty_memory_finds_nothing(
    open_memory: Callable[..., Memory], mode: str
) -> None:
    with open_memory(embedder="hash") as empty:
        assert empty.search("anything", filters={"kind": "none"}, mode=mode) == []  # type: ignore[arg-type]
        assert empty.search("anything", mode=mode, user_id="ada") == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "vector", [[1.0, 2.0], np.zeros(64), np.full(64, np.nan), "text", [[1.0] * 64]]
)
def test_search_by_vector_refuses_bad_vectors(memory: Memory, vector: object) -> None:
    with pytest.raises(InvalidInputError) as error:
        memory.search_by_vector(vector)  # type: ignore[arg-type]
    assert error.value.field == "vector"


def test_async_wrap_shares_the_memory(memory: Memory) -> None:
    shared = AsyncMemory.wrap(memory)

    async def run() -> list[str]:
        await shared.add("figs are purple", id="f", user_id="ada")
        assert await shared.delete_many(["b"], user_id="ada") == 1
        return [h.id for h in await shared.scan(user_id="ada")]

    assert asyncio.run(run()) == ["a", "f"]
    assert [h.id for h in memory.get_many(["f", "b"])] == ["f"]
    with pytest.raises(InvalidInputError) as error:
        AsyncMemory.wrap("not a memory")  # type: ignore[arg-type]
    assert error.value.field == "memory"
