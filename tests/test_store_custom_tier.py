"""A new tier is one class and one registry line: `DictTier`, defined here, is registered
as kind "dict", built through `StoreConfig(tiers=...)` like the built-in kinds, and passes
the same round-trip, promotion and random-operation checks in every position of a store.
It counts the contract calls it gets, so the tests also see that `PageStore` moves pages
through the contract (batch reads, promotion, touch, gather, prefetching) only."""

from __future__ import annotations

import dataclasses
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_store_tiers import (
    assert_same,
    build_page,
    check_promotion,
    check_random_operations,
    check_round_trip,
    kv_page,
    payloads,
)

from memlayer.errors import CapacityError, InvalidInputError, NotFoundError
from memlayer.stores import TIERS, PageStore, PromotionStep, StoreConfig, Tier, build_tiers
from memlayer.types import Page


def copied(page: Page) -> Page:
    """The page with payload tensors of its own (what a tier stores must not alias)."""
    if isinstance(page.payload, (bytes, bytearray)):
        return dataclasses.replace(page, payload=bytes(page.payload))
    return dataclasses.replace(page, payload={n: t.clone() for n, t in page.payload.items()})


class DictTier(Tier):
    """Pages in a dict under a byte budget, least recently used out first.

    `tensors_only` refuses bytes pages (as a GPU tier does). Overrides only the required
    methods; the batch methods are the contract's defaults, wrapped to count calls.
    """

    def __init__(
        self, name: str = "dict", budget: int | None = None, tensors_only: bool = False
    ) -> None:
        super().__init__()
        self.name = name
        self.budget = budget
        self.tensors_only = tensors_only
        self.pages: OrderedDict[str, Page] = OrderedDict()
        self.calls: Counter[str] = Counter()

    def accepts(self, page: Page) -> bool:
        return not (self.tensors_only and isinstance(page.payload, (bytes, bytearray)))

    @property
    def nbytes(self) -> int:
        return sum(page.nbytes for page in self.pages.values())

    def __contains__(self, page_id: object) -> bool:
        return page_id in self.pages

    def ids(self) -> Iterator[str]:
        return iter(list(self.pages))

    def put(self, page: Page) -> list[Page]:
        if not self.accepts(page):
            raise InvalidInputError("page.payload", f"tier {self.name} holds tensors only")
        if self.budget is not None and page.nbytes > self.budget:
            raise CapacityError(f"page {page.id!r} is over tier {self.name!r}'s budget")
        self.pages.pop(page.id, None)
        evicted = []
        while self.budget is not None and self.nbytes + page.nbytes > self.budget:
            evicted.append(self.pages.popitem(last=False)[1])
        self.pages[page.id] = copied(page)
        return evicted

    def get(self, page_id: str) -> Page:
        if page_id not in self.pages:
            self.counters.misses += 1
            raise NotFoundError("page", page_id)
        self.counters.hits += 1
        self.pages.move_to_end(page_id)
        return copied(self.pages[page_id])

    def evict(self, page_id: str) -> None:
        if self.pages.pop(page_id, None) is None:
            raise NotFoundError("page", page_id)

    def close(self) -> None:
        self.pages.clear()

    def get_many(self, page_ids: Sequence[str], *, transient: bool = False) -> list[Page]:
        self.calls["get_many"] += 1
        return super().get_many(page_ids, transient=transient)

    def gather(self, page_ids: Sequence[str], name: str) -> torch.Tensor:
        self.calls["gather"] += 1
        return super().gather(page_ids, name)

    def touch(self, page_ids: Sequence[str]) -> None:
        self.calls["touch"] += 1
        super().touch(page_ids)

    def promote(self, source: Tier, page_ids: Sequence[str]) -> Iterator[PromotionStep]:
        self.calls["promote"] += 1
        yield from super().promote(source, page_ids)

    def prefetching(self) -> AbstractContextManager[None]:
        self.calls["prefetching"] += 1
        return super().prefetching()


TIERS.register("dict")(DictTier.from_options)


def layouts(tmp: Path, biggest: int) -> dict[str, list[dict[str, Any]]]:
    """The dict tier in front, in the middle, and last (unbounded, with no durable tier);
    front tiers are named "gpu" and middle ones "ram", as `check_promotion` expects."""
    gpu = {"kind": "tensor", "name": "gpu", "device": "cpu", "budget": biggest * 2}
    ram = {"kind": "tensor", "name": "ram", "device": "cpu", "budget": biggest * 3}
    disk = {"kind": "disk", "path": tmp / "disk"}
    return {
        "front": [{"kind": "dict", "name": "gpu", "budget": biggest * 2}, ram, disk],
        "middle": [gpu, {"kind": "dict", "name": "ram", "budget": biggest * 3}, disk],
        "last": [gpu, ram, {"kind": "dict", "name": "back"}],
    }


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=st.lists(payloads, min_size=1, max_size=6))
def test_a_registered_tier_round_trips_exactly(specs: list) -> None:
    pages = [build_page(f"p{i}", spec) for i, spec in enumerate(specs)]
    (tier,) = build_tiers(StoreConfig(tiers=[{"kind": "dict", "budget": "1MiB"}]))
    assert isinstance(tier, DictTier) and tier.budget == 2**20
    check_round_trip(tier, pages)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=st.lists(payloads, min_size=2, max_size=8), order=st.randoms(use_true_random=False))
def test_a_registered_tier_promotes_in_every_position(
    tmp_path_factory: pytest.TempPathFactory, specs: list, order: Any
) -> None:
    tmp = tmp_path_factory.mktemp("layouts")
    pages = {f"p{i}": build_page(f"p{i}", spec) for i, spec in enumerate(specs)}
    biggest = max(p.nbytes for p in pages.values()) + 1
    for where, tiers in layouts(tmp, biggest).items():
        store = PageStore.open(tiers=tiers)
        assert isinstance(store.tiers[["front", "middle", "last"].index(where)], DictTier)
        check_promotion(store, pages, order)


def test_budgets_hold_with_a_registered_tier(tmp_path: Path) -> None:
    biggest = kv_page("x", tokens=16).nbytes * 3
    for where in ("front", "middle", "last"):
        check_random_operations(PageStore.open(tiers=layouts(tmp_path / where, biggest)[where]))


def dict_tier(store: PageStore) -> DictTier:
    return next(tier for tier in store.tiers if isinstance(tier, DictTier))


def test_promotion_reads_a_lower_tier_in_one_batch(tmp_path: Path) -> None:
    """A gather of pages held by a lower dict tier reads them with one `get_many`."""
    pages = [kv_page(f"p{i}", seed=i) for i in range(8)]
    size = pages[0].nbytes
    with PageStore.open(
        tiers=[
            {"kind": "tensor", "name": "gpu", "device": "cpu", "budget": size * 4},
            {"kind": "dict", "name": "ram"},
        ]
    ) as store:
        store.put_many(pages)  # the first four are pushed down to the dict tier
        below = dict_tier(store)
        assert set(below.ids()) >= {"p0", "p1", "p2", "p3"}
        below.calls.clear()
        stacked = store.gather(["p2", "p0", "p3"], "k")
        assert torch.equal(stacked, torch.stack([pages[i].payload["k"] for i in (2, 0, 3)]))
        assert below.calls["get_many"] == 1
        assert store.stats()["moved"]["ram->gpu"]["pages"] == 3


def test_a_registered_front_tier_gathers_touches_and_prefetches(tmp_path: Path) -> None:
    pages = [kv_page(f"p{i}", seed=i) for i in range(6)]
    size = pages[0].nbytes
    with PageStore.open(
        tiers=[
            {"kind": "dict", "name": "front", "budget": size * 4},
            {"kind": "disk", "path": tmp_path / "d"},
        ]
    ) as store:
        store.put_many(pages)  # p0, p1 fall out of the front (the disk tier still has them)
        front = dict_tier(store)
        assert list(front.ids()) == ["p2", "p3", "p4", "p5"]
        stacked = store.gather(["p2", "p3", "p0", "p1"], "v")  # p2, p3 kept: touched first
        assert torch.equal(stacked, torch.stack([pages[i].payload["v"] for i in (2, 3, 0, 1)]))
        assert front.calls["touch"] == 1 and front.calls["gather"] == 1
        assert front.calls["promote"] == 1
        store.prefetch(["p4", "p5"]).result()
        assert front.calls["prefetching"] == 1 and {"p4", "p5"} <= set(front.ids())
        for page in pages:
            assert_same(page, store.get(page.id)[0])


def test_pages_a_tier_refuses_go_to_the_next_tier_down(tmp_path: Path) -> None:
    """A bytes page on disk, promoted under a tensors-only front, lands in the RAM tier."""
    blob = Page(id="b", payload=b"semantic bytes", kind="semantic")
    tensor = kv_page("t")
    tiers = [
        {"kind": "dict", "name": "gpu", "tensors_only": True},
        {"kind": "tensor", "name": "ram", "device": "cpu", "budget": 2**16},
        {"kind": "disk", "path": tmp_path / "d"},
    ]
    with PageStore.open(tiers=tiers) as store:
        store.put_many([blob, tensor])
    with PageStore.open(tiers=tiers) as store:  # reopened: both pages on disk only
        store.prefetch(["b", "t"]).result()
        assert "b" in store.tiers[1] and "b" not in store.tiers[0]
        assert "t" in store.tiers[0]
        assert_same(blob, store.get("b")[0])
        assert store.stats()["moved"]["disk->ram"]["pages"] == 1


def test_an_option_the_kind_does_not_take_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"tiers\.1: options of kind 'dict'.*colour"):
        PageStore.open(tiers=[{"kind": "dict", "name": "a"}, {"kind": "dict", "colour": 1}])


def test_registered_names_include_the_new_kind() -> None:
    assert {"dict", "disk", "sql", "tensor"} <= set(TIERS.names())
    assert isinstance(TIERS.create("dict", options={"budget": 8}), DictTier)
