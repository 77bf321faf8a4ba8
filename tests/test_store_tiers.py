"""The tiered page store: exact round trips, budgets, persistence, faults and prefetch."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import itertools
import mmap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from memlayer.errors import (
    CapacityError,
    ClosedError,
    CorruptionError,
    InvalidInputError,
    NotFoundError,
    StorageError,
)
from memlayer.kvretrieval.shared_pages import write_slots
from memlayer.stores import DiskTier, PageStore, SQLTier, StoreConfig, TensorTier, Tier, pinned
from memlayer.stores.disk_tier import HEADER_BYTES, MAGIC, OLD_MAGIC
from memlayer.stores.pinned import registered_bytes
from memlayer.stores.tensor_tier import _runs, _slot_runs, copy_rows
from memlayer.types import Page, Scope

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool]


def make_tensor(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 100).to(dtype)
    return torch.randint(-100, 100, shape, generator=generator).to(dtype)


def kv_page(page_id: str, seed: int = 0, tokens: int = 8, dtype: torch.dtype = torch.bfloat16):
    """A KV-shaped page: keys, values [heads, tokens, dim] and a summary."""
    return Page(
        id=page_id,
        payload={
            "k": make_tensor(seed, (2, tokens, 16), dtype),
            "v": make_tensor(seed + 1, (2, tokens, 16), dtype),
            "summary": make_tensor(seed + 2, (2, 2, 16), torch.float32),
        },
        scope=Scope(tenant_id="t1"),
        metadata={"seed": seed},
    )


def assert_same(a: Page, b: Page) -> None:
    """Byte-exact equality of two pages (payload dtypes, shapes and bits; header fields)."""
    assert (a.id, a.kind, a.scope, a.metadata, a.created_at) == (
        b.id,
        b.kind,
        b.scope,
        b.metadata,
        b.created_at,
    )
    if isinstance(a.payload, bytes):
        assert a.payload == b.payload
        return
    assert isinstance(b.payload, dict) and list(a.payload) == list(b.payload)
    for name, tensor in a.payload.items():
        other = b.payload[name]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape, name
        assert other.device.type == "cpu" or other.device == tensor.device
        left = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
        right = other.cpu().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(left, right), name


payloads = st.one_of(
    st.binary(min_size=0, max_size=300),
    st.dictionaries(
        st.text("abcdefgh", min_size=1, max_size=6),
        st.tuples(
            st.integers(0, 2**16),
            st.lists(st.integers(0, 5), min_size=0, max_size=3),
            st.sampled_from(DTYPES),
        ),
        min_size=1,
        max_size=3,
    ),
)


def build_page(page_id: str, spec: Any) -> Page:
    if isinstance(spec, bytes):
        return Page(id=page_id, payload=spec, kind="semantic")
    payload = {
        n: make_tensor(seed, tuple(shape), dtype) for n, (seed, shape, dtype) in spec.items()
    }
    return Page(id=page_id, payload=payload, metadata={"n": len(payload)})


def every_tier(tmp: Path) -> list[Any]:
    return [
        TensorTier("ram", "cpu", 2**20),
        DiskTier(tmp / "disk"),
        SQLTier(f"sqlite:///{tmp / 'pages.db'}"),
    ]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=st.lists(payloads, min_size=1, max_size=6))
def test_every_tier_round_trips_exactly(
    tmp_path_factory: pytest.TempPathFactory, specs: list
) -> None:
    tmp = tmp_path_factory.mktemp("tiers")
    pages = [build_page(f"p{i}", spec) for i, spec in enumerate(specs)]
    for tier in every_tier(tmp):
        check_round_trip(tier, pages)


def check_round_trip(tier: Tier, pages: list[Page]) -> None:
    """Every page put (nothing evicted) comes back bit for bit, one by one and as a batch."""
    for page in pages:
        assert tier.put(page) == []
    for page in pages:
        assert_same(page, tier.get(page.id))
    for page, got in zip(pages[::-1], tier.get_many([p.id for p in pages[::-1]]), strict=True):
        assert_same(page, got)
    tier.close()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=st.lists(payloads, min_size=2, max_size=8), order=st.randoms(use_true_random=False))
def test_every_promotion_path_round_trips(
    tmp_path_factory: pytest.TempPathFactory, specs: list, order: Any
) -> None:
    """gpu(cpu device) <- ram <- disk and <- sql: small budgets force demotion and promotion."""
    tmp = tmp_path_factory.mktemp("paths")
    pages = {f"p{i}": build_page(f"p{i}", spec) for i, spec in enumerate(specs)}
    biggest = max(p.nbytes for p in pages.values()) + 1
    for back in ({"path": tmp / "disk"}, {"url": f"sqlite:///{tmp / 'p.db'}"}):
        store = PageStore.open(
            gpu_budget=biggest * 2, gpu_device="cpu", ram_budget=biggest * 3, **back
        )
        check_promotion(store, pages, order)


def check_promotion(store: PageStore, pages: dict[str, Page], order: Any) -> None:
    """Gets in shuffled orders return every page exactly; when the tensor pages overflow
    the front tier ("gpu", budget 2 × the biggest page), pages moved down and back up."""
    biggest = max(p.nbytes for p in pages.values()) + 1
    on_gpu = sum(p.nbytes for p in pages.values() if isinstance(p.payload, dict))
    store.put_many(list(pages.values()))
    ids = list(pages)
    for _ in range(3):
        order.shuffle(ids)
        for page_id, got in zip(ids, store.get(ids), strict=True):
            assert_same(pages[page_id], got)
    moved = store.stats()["moved"]
    store.close()
    if on_gpu > biggest * 2:
        assert moved["gpu->ram"]["pages"] > 0 and moved["ram->gpu"]["pages"] > 0


def test_budgets_hold_after_every_operation(tmp_path: Path) -> None:
    """A randomized sequence of puts, gets, deletes and prefetches against a dict model."""
    store = PageStore.open(
        gpu_budget="6KiB", gpu_device="cpu", ram_budget="10KiB", path=tmp_path / "d"
    )
    check_random_operations(store)


def check_random_operations(store: PageStore) -> None:
    """400 random puts, gets, deletes and prefetches match a dict; budgets always hold."""
    import random

    rng = random.Random(7)
    model: dict[str, Page] = {}
    for step in range(400):
        action = rng.random()
        if action < 0.4 or not model:
            page = kv_page(f"p{rng.randrange(60)}", seed=step, tokens=rng.choice([4, 8, 16]))
            store.put(page)
            model[page.id] = page
        elif action < 0.75:
            ids = rng.sample(sorted(model), min(len(model), rng.randint(1, 5)))
            for page_id, got in zip(ids, store.get(ids), strict=True):
                assert_same(model[page_id], got)
        elif action < 0.85:
            store.prefetch(rng.sample(sorted(model), min(len(model), 3)))
        else:
            victim = rng.choice(sorted(model))
            store.delete(victim)
            del model[victim]
        for tier in store.tiers:
            assert tier.budget is None or tier.nbytes <= tier.budget, (step, tier.name)
        assert store.ids() == set(model)
    store.close()


def test_reopen_returns_every_page(tmp_path: Path) -> None:
    pages = [kv_page(f"p{i}", seed=i) for i in range(50)]
    with PageStore.open(ram_budget="4KiB", path=tmp_path / "d", segment_bytes="8KiB") as store:
        store.put_many(pages[:25])
        for page in pages[25:]:
            store.put(page)
        store.delete("p3")
        assert store.tiers[1].stats()["segments"] > 1
    with PageStore.open(ram_budget="4KiB", path=tmp_path / "d") as store:
        assert store.ids() == {p.id for p in pages} - {"p3"}
        for page in pages:
            if page.id != "p3":
                assert_same(page, store.get(page.id)[0])


def test_prefetch_then_get_equals_get(tmp_path: Path) -> None:
    pages = [kv_page(f"p{i}", seed=i) for i in range(30)]
    with PageStore.open(gpu_budget="8KiB", gpu_device="cpu", path=tmp_path / "a") as store:
        store.put_many(pages)
        ids = [f"p{i}" for i in range(0, 30, 3)]
        plain = store.get(ids)
    with PageStore.open(gpu_budget="8KiB", gpu_device="cpu", path=tmp_path / "a") as store:
        future = store.prefetch(ids)
        fetched = store.get(ids)
        assert future.done()
        for a, b in zip(plain, fetched, strict=True):
            assert_same(a, b)
        assert store.stats()["moved"]["disk->gpu"]["pages"] >= len(ids)
        gathered = store.gather(ids[:5], "k")
        assert torch.equal(gathered, torch.stack([p.payload["k"] for p in plain[:5]]))
        with pytest.raises(CapacityError, match="gather fewer"):
            store.gather(ids, "k")


def test_gather_is_one_stacked_read_of_the_front_tier(tmp_path: Path) -> None:
    tier = TensorTier("gpu", "cpu", None)
    pages = [kv_page(f"p{i}", seed=i) for i in range(40)]
    for page in pages:
        tier.put(page)
    slab, slots = tier.locate([p.id for p in pages])
    assert slab.fields["k"].shape[0] >= 40 and slots.shape == (40,)
    stacked = tier.gather([p.id for p in pages[::-1]], "v")
    assert torch.equal(stacked, torch.stack([p.payload["v"] for p in pages[::-1]]))


@pytest.mark.gpu
@pytest.mark.parametrize("large", [False, True])
def test_a_page_locked_host_slab_copies_to_the_gpu_exactly_and_unlocks_when_freed(
    large: bool,
) -> None:
    """A RAM tier behind a GPU page-locks its slab. A small one doubles by copying, each
    earlier size unlocked when freed (PyTorch's caching host allocator would keep them all);
    a large one reserves address space and locks each growth's rows as one more range (a
    copy that spans two registered ranges failed on an H200). Every page reads back, non-blocking
    copies of the slab to the GPU (one per locked range) are exact, so is a kernel reading it
    whole over the bus, and freeing the tier unlocks it all."""
    before = registered_bytes()
    tier = TensorTier("ram", "cpu", None, pin=True)
    pages = _big_pages(9) if large else [kv_page(f"p{i}", seed=i) for i in range(40)]
    for page in pages:  # the slab grows six times (small) or four (large)
        tier.put(page)
    slab, _ = tier.locate([p.id for p in pages])
    assert (slab.reserved is not None and slab.reserved["k"].shape[0] > slab.capacity) == large
    assert all(tensor.is_pinned() for tensor in slab.fields.values())
    held = sum(tensor.numel() * tensor.element_size() for tensor in slab.fields.values())
    assert registered_bytes() - before == held
    for page in pages:
        assert_same(tier.get(page.id), page)
    keys = slab.fields["k"]
    assert bool(pinned.range_starts(keys)) == large  # grown in ranges: copies split at them
    bounds = [0, *pinned.range_starts(keys), keys.shape[0]]
    parts = [keys[a:b].to("cuda", non_blocking=True) for a, b in itertools.pairwise(bounds)]
    seen = pinned.device_rows(keys, torch.device("cuda"), torch.int64)
    assert seen is not None
    rows = torch.arange(seen.shape[0], device="cuda")
    over_the_bus = seen.index_select(0, rows)  # one kernel reads every range (not a memcpy)
    torch.cuda.synchronize()
    # bit for bit: rows past the pages in use are uninitialised and may hold NaNs
    raw = keys.view(torch.uint8)
    assert torch.equal(torch.cat(parts).cpu().view(torch.uint8), raw)
    assert torch.equal(over_the_bus.cpu().view(torch.uint8).view(raw.shape), raw)
    del tier, slab, keys, raw
    gc.collect()
    assert registered_bytes() == before


@pytest.mark.gpu
@pytest.mark.parametrize("large", [False, True])
def test_scattered_pages_come_up_from_a_page_locked_slab_through_one_gather_over_the_bus(
    large: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages scattered over a page-locked RAM slab (a top-k's picks) are promoted into
    scattered GPU slots by kernels reading the host rows over the bus, not by one copy per
    page; every byte arrives, and the pages left out of the promotion stay as they were."""
    from memlayer.stores import tensor_tier

    ram = TensorTier("ram", "cpu", None, pin=True)
    pages = _big_pages(9) if large else [kv_page(f"p{i}", seed=i) for i in range(40)]
    ram.put_many(pages)
    gpu = TensorTier("gpu", "cuda", None)
    gpu.copy_from(ram, [p.id for p in pages[:6]])
    for page in pages[:6:2]:  # holes: the promoted pages take scattered GPU slots
        gpu.evict(page.id)
    seen: list[torch.Tensor] = []
    real = tensor_tier.device_rows

    def spy(*args: Any) -> torch.Tensor | None:
        found = real(*args)
        if found is not None:
            seen.append(found)
        return found

    monkeypatch.setattr(tensor_tier, "device_rows", spy)
    monkeypatch.setattr(tensor_tier, "GATHER_OVER_BUS", True)
    picked = pages[::3][::-1]
    gpu.copy_from(ram, [p.id for p in picked])
    assert seen and all(view.is_cuda for view in seen)
    for page in picked + pages[1:6:2]:
        held = gpu.get(page.id)
        for name, tensor in page.payload.items():
            on_gpu = held.payload[name]
            assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), tensor)


@pytest.mark.gpu
def test_pages_demoted_from_the_gpu_land_in_page_locked_ram_before_the_cpu_reads_them() -> None:
    """Demotion from the GPU into page-locked RAM does not wait for the GPU's queue (the GPU
    is still busy when it returns), and a read of the RAM tier waits for the bytes: each
    page reads back exact at once, and a promotion straight back up is exact too."""
    pages = [kv_page(f"p{i}", seed=i, tokens=256) for i in range(24)]
    on_gpu = [
        dataclasses.replace(p, payload={n: t.cuda() for n, t in p.payload.items()}) for p in pages
    ]
    gpu = TensorTier("gpu", "cuda", 8 * pages[0].nbytes)
    ram = TensorTier("ram", "cpu", None, pin=True)
    ram.put_many([kv_page(f"w{i}", tokens=256) for i in range(32)])
    for i in range(1, 32):  # room for what comes down, without growing (locking) the slab
        ram.evict(f"w{i}")
    store = PageStore([gpu, ram])
    store.put_many(on_gpu[:8])
    store.put_many(on_gpu[8:16])  # warm: the batch path once (pinned index buffers); 8 down
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of the GPU's clock
    torch.cuda.set_sync_debug_mode("error")
    try:
        store.put_many(on_gpu[16:])  # the next 8 coldest go down behind the sleep
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not torch.cuda.current_stream().query(), "the demotion waited for the GPU"
    assert sorted(ram.ids()) == sorted(["w0"] + [p.id for p in pages[:16]])
    assert all(p.id in gpu for p in pages[16:])
    for page in pages[8:16]:
        assert_same(ram.get(page.id), page)
    store.bring_up([p.id for p in pages[8:12]])
    for page in pages[8:12]:
        assert torch.equal(gpu.gather([page.id], "k")[0].cpu(), page.payload["k"])


@pytest.mark.parametrize("budget_pages", [None, 5])
def test_put_many_writes_a_batch_and_reports_its_slots_once(budget_pages: int | None) -> None:
    """A layer's sealed pages go in as one batch: every page reads back exactly, the slots
    come to the listener in one call for the pages that fitted (free slots, then the slots
    of older pages evicted together), and with a budget smaller than the batch the rest
    evict the oldest, one at a time, as `put` would."""
    size = kv_page("x").nbytes
    tier = TensorTier("ram", "cpu", None if budget_pages is None else budget_pages * size)
    calls: list[tuple[list[str], list[int]]] = []
    tier.watch(lambda ids, slots: calls.append((list(ids), list(slots))))
    tier.put(kv_page("old", seed=99))
    pages = [kv_page(f"p{i}", seed=i) for i in range(8)]
    evicted = tier.put_many(pages)
    kept = pages if budget_pages is None else pages[-budget_pages:]
    old = ["old"] if budget_pages is None else []
    assert sorted(tier.ids()) == sorted(old + [p.id for p in kept])
    for page in kept:
        assert_same(tier.get(page.id), page)
    assert tier.budget is None or tier.nbytes <= tier.budget
    batch_ids, batch_slots = next(call for call in calls if len(call[0]) > 1)
    fitted = 8 if budget_pages is None else budget_pages  # "old" evicted to make room
    assert batch_ids == [p.id for p in pages[:fitted]] and len(set(batch_slots)) == fitted
    assert batch_slots == sorted(batch_slots)  # ascending, so consecutive ones copy as one run
    if budget_pages is not None:
        assert [p.id for p in evicted] == ["old", "p0", "p1", "p2"]
        assert_same(evicted[1], pages[0])  # evicted pages carry their payloads down


def test_a_bounded_front_tier_evicts_and_demotes_in_batches() -> None:
    """Sealing batch after batch into a full front tier: each batch evicts the coldest
    pages together (one listener call), they move down as one batch, every page reads back
    exactly from wherever it went, and the moves are counted."""
    size = kv_page("x").nbytes
    front, ram = TensorTier("gpu", "cpu", 6 * size), TensorTier("ram", "cpu", None)
    store = PageStore([front, ram])
    moves: list[tuple[list[str], list[int]]] = []
    front.watch(lambda ids, slots: moves.append((list(ids), list(slots))))
    pages = [kv_page(f"p{i}", seed=i) for i in range(20)]
    for start in range(0, 20, 4):
        store.put_many(pages[start : start + 4])
    assert sorted(front.ids()) == sorted(p.id for p in pages[14:])
    assert sorted(ram.ids()) == sorted(p.id for p in pages[:14])
    assert front.nbytes <= 6 * size
    departures = [ids for ids, slots in moves if set(slots) == {-1}]
    ids = [p.id for p in pages]  # the second batch fits two, evicts two; the others four
    assert departures == [ids[0:2], ids[2:6], ids[6:10], ids[10:14]]
    assert store.stats()["moved"]["gpu->ram"]["pages"] == 14
    for page in pages:
        assert_same(ram.get(page.id) if page.id in ram else front.get(page.id), page)


class _CopyCount(TorchDispatchMode):
    """Counts the torch operations that copy page data, by name."""

    COPIES = ("clone", "index_select", "stack", "cat", "copy_", "index_copy")

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in self.COPIES:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("promoted", [3, 6])
def test_promoting_into_a_full_tier_reads_its_victims_together(promoted: int) -> None:
    """Bringing pages up into a full front tier evicts its coldest pages with one gather per
    payload name and writes them below in one copy per name: the copies do not grow with
    the number of pages (3 or 6 here), and every page reads back exactly where it went."""
    size = kv_page("x").nbytes
    front, ram = TensorTier("gpu", "cpu", 8 * size), TensorTier("ram", "cpu", None)
    store = PageStore([front, ram])
    pages = [kv_page(f"p{i}", seed=i) for i in range(24)]
    for start in range(0, 24, 8):
        store.put_many(pages[start : start + 8])  # front: p16..p23; ram: p0..p15
    counter = _CopyCount()
    with counter:
        store.bring_up([p.id for p in pages[:promoted]])
    assert sorted(front.ids()) == sorted(p.id for p in pages[:promoted] + pages[16 + promoted :])
    # per payload name (3): one gather of the victims; one copy each of them into the tier
    # below, of that tier's slab as it grows, and of the pages coming up
    assert counter.counts == {"index_select": 3, "copy_": 9}, counter.counts
    for page in pages:
        assert_same(front.get(page.id) if page.id in front else ram.get(page.id), page)


def test_put_many_falls_back_for_mixed_or_repeated_pages() -> None:
    """Pages of two signatures, or one id twice, are stored one by one (the last write
    of an id wins), exactly as `put` would store them."""
    tier = TensorTier("ram", "cpu", None)
    mixed = [kv_page("a", seed=1), kv_page("b", seed=2, tokens=4), kv_page("a", seed=3)]
    assert tier.put_many(mixed) == []
    assert sorted(tier.ids()) == ["a", "b"]
    assert_same(tier.get("a"), mixed[2])
    assert_same(tier.get("b"), mixed[1])
    with pytest.raises(InvalidInputError):
        tier.put_many([Page(id="", payload={"k": torch.zeros(2)})])


@settings(max_examples=60, deadline=None)
@example(moves=[(2, 5), (3, 6), (4, 7), (9, -1), (10, -1), (11, 0), (12, 1), (0, 3)])
@given(moves=st.lists(st.tuples(st.integers(0, 15), st.integers(-1, 20)), min_size=1, max_size=16))
def test_write_slots_equals_indexed_assignment(moves: list[tuple[int, int]]) -> None:
    """Runs of consecutive pages and slots, scattered moves and departures (-1) all land
    where table[index] = slot puts them."""
    moves = list(dict(moves).items())  # a page moves once per batch
    table, expected = torch.full((16,), -7), torch.full((16,), -7)
    write_slots(table, [i for i, _ in moves], [s for _, s in moves])
    for index, slot in moves:
        expected[index] = slot
    assert torch.equal(table, expected)


@settings(max_examples=60, deadline=None)
@example(rows=[(i, i + 1) for i in range(10)], breaks={3, 7})  # one long run, split twice
@given(
    rows=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 11)), min_size=1, max_size=12),
    breaks=st.sets(st.integers(1, 11), max_size=3),
)
def test_copy_rows_equals_indexed_assignment(rows: list[tuple[int, int]], breaks: set[int]) -> None:
    """Runs, scattered rows and repeated destinations all land where dst[d] = src[s] puts them.
    The cross-device plan's runs (and a batch write's slot runs) cover the same rows, and none
    spans a row where a locked range begins (`breaks`)."""
    rows = list(dict((d, s) for d, s in rows).items())  # a destination row is written once
    dst_rows, src_rows = [d for d, _ in rows], [s for _, s in rows]
    src = torch.arange(12 * 6, dtype=torch.bfloat16).reshape(12, 2, 3)
    got, expected = torch.zeros(12, 2, 3, dtype=torch.bfloat16), torch.zeros(12, 2, 3)
    copy_rows(got, dst_rows, src, src_rows)
    expected[dst_rows] = src[src_rows].float()
    assert torch.equal(got.float(), expected)
    # the cross-device plan (one slice copy per run) covers exactly the same row pairs
    runs = _runs(sorted(rows), breaks)
    covered = [(d + i, s + i) for d, s, length in runs for i in range(length)]
    assert covered == sorted(rows)
    for d, s, length in runs:
        assert not breaks & ({*range(d + 1, d + length)} | {*range(s + 1, s + length)})
    slots = sorted({d for d, _ in rows})
    slot_runs = _slot_runs(slots, breaks)
    assert [slots[first + i] for first, n in slot_runs for i in range(n)] == slots
    for first, n in slot_runs:
        assert slots[first + n - 1] - slots[first] == n - 1
        assert not breaks & {*range(slots[first] + 1, slots[first] + n)}


def test_gather_promotes_a_batch_from_scattered_slots(tmp_path: Path) -> None:
    """Pages spread over fragmented slabs come up to the front as exact batches."""
    import random

    rng = random.Random(3)
    pages = {f"p{i}": kv_page(f"p{i}", seed=i) for i in range(48)}
    size = pages["p0"].nbytes
    gpu, ram = TensorTier("gpu", "cpu", size * 8), TensorTier("ram", "cpu", None)
    store = PageStore([gpu, ram, DiskTier(tmp_path / "d")])
    store.put_many([pages[f"p{i}"] for i in range(40)])
    for page_id in ("p1", "p5", "p6", "p17"):
        store.delete(page_id)
        del pages[page_id]
    store.put_many([pages[f"p{i}"] for i in range(40, 48)])  # refills the freed RAM slots
    for _ in range(12):
        picked = rng.sample(sorted(pages), rng.randint(1, 8))
        stacked = store.gather(picked, "v")
        assert torch.equal(stacked, torch.stack([pages[i].payload["v"] for i in picked]))
        assert gpu.nbytes <= size * 8
    assert store.stats()["moved"]["ram->gpu"]["pages"] > 12
    with pytest.raises(CapacityError, match="budget"):
        gpu.copy_from(ram, sorted(pages)[:9])
    store.close()


def test_lru_and_lfu_evict_the_coldest() -> None:
    size = kv_page("x").nbytes
    for policy, expected in (("lru", "b"), ("lfu", "c")):
        tier = TensorTier("ram", "cpu", size * 3, policy=policy)
        for name in "abc":
            tier.put(kv_page(name))
        for name in ("a", "b", "a", "b", "c", "a"):
            tier.get(name)
        if policy == "lru":
            tier.get("c")
        evicted = tier.put(kv_page("d"))
        assert [p.id for p in evicted] == [expected]
        assert tier.nbytes <= size * 3


def test_bad_input_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    store = PageStore.open(gpu_budget="4KiB", gpu_device="cpu", path=tmp_path / "d")
    store.put(kv_page("ok"))
    before = store.stats()["tiers"]
    with pytest.raises(CapacityError, match="budget"):
        store.put(kv_page("huge", tokens=512))
    with pytest.raises(InvalidInputError, match=r"payload\['z'\].*dtype"):
        store.put(Page(id="c", payload={"z": torch.zeros(2, dtype=torch.complex64)}))
    with pytest.raises(InvalidInputError, match=r"page\.payload"):
        store.put(Page(id="e", payload={}))
    with pytest.raises(NotFoundError, match="nope"):
        store.get(["ok", "nope"])
    with pytest.raises(NotFoundError):
        store.delete("nope")
    assert store.ids() == {"ok"}
    after = store.stats()["tiers"]
    assert {k: v["pages"] for k, v in after.items()} == {k: v["pages"] for k, v in before.items()}
    store.close()
    with pytest.raises(ClosedError):
        store.get("ok")
    with pytest.raises(ClosedError):
        store.put(kv_page("late"))


def test_config_validates_budgets_and_units(tmp_path: Path) -> None:
    assert StoreConfig(ram_budget="8GiB").ram_budget == 8 * 2**30
    with pytest.raises(InvalidInputError, match="ram_budget"):
        PageStore.open(ram_budget="lots")
    with pytest.raises(InvalidInputError, match="colour"):
        PageStore.open(colour="blue")
    with pytest.raises(InvalidInputError, match="last tier"):
        PageStore([TensorTier("ram", "cpu", 1024)])
    with pytest.raises(InvalidInputError, match="budget"):
        TensorTier("gpu", "cpu", 0)


def test_flipped_byte_is_detected_and_never_returned(tmp_path: Path) -> None:
    pages = [kv_page(f"p{i}", seed=i) for i in range(5)]
    tier = DiskTier(tmp_path / "d")
    for page in pages:
        tier.put(page)
    tier.close()
    segment = next((tmp_path / "d").glob("segment-*.log"))
    data = bytearray(segment.read_bytes())
    starts = [i for i in range(len(data)) if data.startswith(MAGIC, i)]
    assert len(starts) == 5
    inside_p2 = (starts[2] + starts[3]) // 2
    data[inside_p2] ^= 0x40
    segment.write_bytes(bytes(data))
    tier = DiskTier(tmp_path / "d")
    with pytest.raises(CorruptionError, match="p2"):
        tier.get("p2")
    assert "p2" in tier and tier.stats()["corrupt"] == 1  # kept: get raises every time
    with pytest.raises(CorruptionError, match="p2"):
        tier.get("p2")
    for page in pages:
        if page.id != "p2":
            assert_same(page, tier.get(page.id))
    tier.close()
    data[inside_p2] ^= 0x40
    data[starts[3] + 5] ^= 0xFF  # p3's header: skipped on open, the rest still read
    segment.write_bytes(bytes(data))
    tier = DiskTier(tmp_path / "d")
    assert set(tier.ids()) == {"p0", "p1", "p2", "p4"} and tier.stats()["corrupt"] == 1
    assert [(d.segment, d.offset, d.page_id) for d in tier.verify()] == [(1, starts[3], None)]
    assert_same(pages[4], tier.get("p4"))
    tier.close()


def test_torn_tail_is_cut_and_earlier_records_kept(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path / "d")
    for i in range(3):
        tier.put(kv_page(f"p{i}", seed=i))
    tier.close()
    segment = next((tmp_path / "d").glob("segment-*.log"))
    size = segment.stat().st_size
    segment.write_bytes(segment.read_bytes()[: size - 10])
    tier = DiskTier(tmp_path / "d")
    assert set(tier.ids()) == {"p0", "p1"}
    late = kv_page("p9", seed=9)
    tier.put(late)
    tier.close()
    tier = DiskTier(tmp_path / "d")
    assert set(tier.ids()) == {"p0", "p1", "p9"} and tier.stats()["corrupt"] == 0
    assert_same(late, tier.get("p9"))
    tier.close()


def test_compaction_reclaims_deleted_pages(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path / "d", segment_bytes=16 * 2**10)
    pages = [kv_page(f"p{i}", seed=i) for i in range(60)]
    tier.put_many(pages)
    for page in pages[:45]:
        tier.evict(page.id)
    freed = tier.compact()
    assert freed > 40 * pages[0].nbytes
    tier.close()
    tier = DiskTier(tmp_path / "d")
    assert set(tier.ids()) == {p.id for p in pages[45:]}
    for page in pages[45:]:
        assert_same(page, tier.get(page.id))
    tier.close()


def test_concurrent_readers_and_one_writer(tmp_path: Path) -> None:
    store = PageStore.open(gpu_budget="16KiB", gpu_device="cpu", ram_budget="32KiB", path=tmp_path)
    store.put_many([kv_page(f"p{i}", seed=i) for i in range(20)])
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(offset: int) -> None:
        try:
            step = 0
            while not stop.is_set():
                page_id = f"p{(offset + step) % 20}"
                got = store.get(page_id)[0]
                assert torch.equal(
                    got.payload["k"], kv_page(page_id, int(page_id[1:])).payload["k"]
                )
                step += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for i in range(20, 80):
        store.put(kv_page(f"p{i}", seed=i))
        if i % 7 == 0:
            store.prefetch([f"p{i - 3}", f"p{i - 5}"])
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert len(store) == 80
    store.close()


def test_a_segment_of_the_old_format_is_refused_untouched(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    segment = folder / "segment-00000001.log"
    segment.write_bytes(OLD_MAGIC + bytes(64))
    with pytest.raises(StorageError, match="format 1"):
        DiskTier(folder)
    assert segment.read_bytes() == OLD_MAGIC + bytes(64)


def test_transient_pages_outlive_compaction(tmp_path: Path) -> None:
    """A transient read views the segment's map; compaction must not pull it away."""
    tier = DiskTier(tmp_path / "d")
    pages = [kv_page(f"p{i}", seed=i) for i in range(4)]
    tier.put_many(pages)
    view = tier.get("p1", transient=True)
    tier.evict("p0")
    tier.compact()
    assert_same(pages[1], view)
    assert_same(pages[1], tier.get("p1"))
    tier.close()
    assert_same(pages[1], view)


def test_header_bytes_constant_matches_layout() -> None:
    assert HEADER_BYTES == 4 + 1 + 2 + 8 + 8 + 8


def _thp_eligible(address: int) -> bool | None:
    """THPeligible of the mapping that holds `address` (None: no such line)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().split("\n"):
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:
            low, high = (int(x, 16) for x in fields[0].split("-"))
            inside = low <= address < high
        elif inside and fields[:1] == ["THPeligible:"]:
            return fields[1] == "1"
    return None


def _advised_mappings_get_huge_pages() -> bool:
    """Whether this kernel and process grant huge pages to a mapping that asks for them: THP
    can be off system-wide, or for the process (`prctl(PR_SET_THP_DISABLE)`, as some
    containers set), and then no advice of ours can matter."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or not Path("/proc/self/smaps").exists():
        return False
    probe = mmap.mmap(-1, 4 * (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        probe.madvise(mmap.MADV_HUGEPAGE)
        first_byte = ctypes.c_char.from_buffer(probe)
        begin = ctypes.addressof(first_byte)
        del first_byte  # an exported buffer would keep the map from closing
        return _thp_eligible(-(-begin // (2 << 20)) * (2 << 20)) is True
    finally:
        probe.close()


@pytest.mark.skipif(
    not _advised_mappings_get_huge_pages(),
    reason="this kernel or process grants no transparent huge pages, even when asked",
)
def test_a_page_locked_reservation_asks_for_huge_pages_and_a_ram_slab_does_not() -> None:
    """A slab behind a GPU is locked page by page: 2 MB pages make that 512 times fewer. A
    plain RAM slab stays on 4 KB pages, whose first touch skips direct compaction.

    The slab is 64 MB, past glibc's largest mmap threshold (32 MB), so it gets a mapping of its
    own: a smaller one may reuse heap that numpy advised for an array of 4 MB or more, and
    inherit that advice, which no code of ours asked for."""
    reserved = pinned.pinned_reserve((64, 1024, 1024), torch.float32)  # nothing locked yet
    inside = -(-reserved.data_ptr() // (2 << 20)) * (2 << 20) + 4096  # in a whole 2 MB page
    assert _thp_eligible(inside) is True
    tier = TensorTier("ram", "cpu", None, pin=False)
    payload = {"k": make_tensor(1, (4096, 4096), torch.float32)}  # a 64 MB slot
    tier.put(Page(id="big", payload=payload, scope=Scope(tenant_id="t1")))
    slab = next(iter(tier._slabs.values())).fields["k"]
    inside = -(-slab.data_ptr() // (2 << 20)) * (2 << 20) + 4096
    if "[madvise]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        assert _thp_eligible(inside) is False  # (with THP "always", every mapping is)
    assert torch.equal(tier.get("big").payload["k"], payload["k"])


def _big_pages(count: int, start: int = 0) -> list[Page]:
    """Pages of 16 MB (a slab of them passes RESERVE_FROM at its fourth)."""
    return [
        Page(
            id=f"big{i}",
            payload={"k": make_tensor(i, (4096, 1024), torch.float32)},
            scope=Scope(tenant_id="t1"),
        )
        for i in range(start, start + count)
    ]


def test_a_large_ram_slab_grows_in_place_in_its_reserved_address_space() -> None:
    """Growing a slab past RESERVE_FROM must not copy it: the same memory, a longer view."""
    tier = TensorTier("ram", "cpu", None, pin=False)
    pages = _big_pages(4)
    tier.put_many(pages)  # 4 slots: 64 MB, the reserve is taken
    slab = next(iter(tier._slabs.values()))
    where = slab.fields["k"].data_ptr()
    assert slab.reserved is not None and slab.reserved["k"].shape[0] > 4
    more = _big_pages(5, start=4)
    tier.put_many(more)  # 9 slots: grown twice
    assert slab.capacity >= 9 and slab.fields["k"].data_ptr() == where
    assert tier.nbytes == slab.capacity * 16 << 20  # what is held, not what is reserved
    for page in pages + more:
        assert torch.equal(tier.get(page.id).payload["k"], page.payload["k"])


def _record_page_locks(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Stand in for cudaHostRegister / Unregister: the ranges locked now, by address; a
    range locked twice, or overlapping one that is, fails the test (as it fails in CUDA)."""
    locked: dict[int, int] = {}

    def register(address: int, nbytes: int) -> int:
        assert all(address >= a + n or address + nbytes <= a for a, n in locked.items())
        locked[address] = nbytes
        return 0

    monkeypatch.setattr(pinned, "_cuda_register", register)
    monkeypatch.setattr(pinned, "_cuda_unregister", locked.pop)
    return locked


def test_a_page_locked_slab_grows_in_place_locking_only_its_new_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A RAM slab behind a GPU, past RESERVE_FROM, reserves address space and page-locks only
    the rows in use as it grows, each growth's new rows as one more range (rows locked once):
    the slab never moves (no copy of its old rows), every page reads back, and all of it is
    unlocked when the tier goes. CUDA's calls are recorded here; the real ones run under the
    `gpu` marker."""
    locked = _record_page_locks(monkeypatch)
    before = registered_bytes()
    tier = TensorTier("ram", "cpu", None, pin=True)
    pages = _big_pages(4)
    tier.put_many(pages)  # 4 slots: 64 MB, the reserve is taken (the small slabs unlocked)
    slab = next(iter(tier._slabs.values()))
    where = slab.fields["k"].data_ptr()
    assert locked == {where: 4 * (16 << 20)}
    more = _big_pages(5, start=4)
    tier.put_many(more)  # 9 slots: grown twice
    assert slab.capacity == 16 and slab.fields["k"].data_ptr() == where
    row = 16 << 20
    assert locked == {where: 4 * row, where + 4 * row: 4 * row, where + 8 * row: 8 * row}
    assert pinned.range_starts(slab.fields["k"]) == [4, 8]
    assert pinned.fully_locked(slab.fields["k"])
    assert registered_bytes() - before == slab.capacity * (16 << 20)
    for page in pages + more:
        assert torch.equal(tier.get(page.id).payload["k"], page.payload["k"])
    del tier, slab
    gc.collect()
    assert locked == {} and registered_bytes() == before


def test_a_page_locked_slab_keeps_its_rows_locked_when_cuda_refuses_more(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Growing past what CUDA will lock warns, keeps the rows locked before locked, and
    loses no page; the slab's rows are then not all locked, so no GPU kernel reads them."""
    locked = _record_page_locks(monkeypatch)
    record = pinned._cuda_register
    most = 4 * (16 << 20)

    def register(address: int, nbytes: int) -> int:  # a reservation's first range only
        inside = any(
            r.address < address < r.address + r.nbytes for r in pinned._reservations.values()
        )
        return 2 if inside else record(address, nbytes)

    monkeypatch.setattr(pinned, "_cuda_register", register)
    tier = TensorTier("ram", "cpu", None, pin=True)
    pages = _big_pages(6)
    tier.put_many(pages)
    slab = next(iter(tier._slabs.values()))
    assert slab.capacity == 8 and locked == {slab.fields["k"].data_ptr(): most}
    assert not pinned.fully_locked(slab.fields["k"])
    assert pinned.device_rows(slab.fields["k"], torch.device("cuda"), torch.int64) is None
    assert "could not page-lock" in caplog.text
    for page in pages:
        assert torch.equal(tier.get(page.id).payload["k"], page.payload["k"])


def test_a_page_locked_slab_whose_reserve_is_refused_grows_by_copying(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    locked = _record_page_locks(monkeypatch)

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("address space refused")

    monkeypatch.setattr(pinned.mmap, "mmap", refuse)
    tier = TensorTier("ram", "cpu", None, pin=True)
    pages = _big_pages(6)
    tier.put_many(pages)
    slab = next(iter(tier._slabs.values()))
    assert slab.reserved["k"].shape[0] == slab.capacity == 8
    assert locked == {slab.fields["k"].data_ptr(): 8 * (16 << 20)}  # the whole slab, once
    for page in pages:
        assert torch.equal(tier.get(page.id).payload["k"], page.payload["k"])


def test_a_budget_bounds_the_reserve_and_a_refused_reserve_grows_by_copying(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bounded = TensorTier("ram", "cpu", 10 * (16 << 20), pin=False)
    bounded.put_many(_big_pages(4))
    assert next(iter(bounded._slabs.values())).reserved["k"].shape[0] == 10
    monkeypatch.setattr("memlayer.stores.tensor_tier._physical_bytes", lambda: 1 << 62)
    refused = TensorTier("ram", "cpu", None, pin=False)  # 2**60 bytes: no allocator gives it
    pages = _big_pages(6)
    refused.put_many(pages)
    slab = next(iter(refused._slabs.values()))
    assert slab.reserved["k"].shape[0] == slab.capacity == 8
    for page in pages:
        assert torch.equal(refused.get(page.id).payload["k"], page.payload["k"])
