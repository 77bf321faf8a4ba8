"""The batch methods of the `Tier` contract where the built-in tiers override them for speed:
one fsync per `put_many`, one slab copy per payload signature when pages come up from RAM,
one query per batch read from SQL; and the store keeping what a gather already has."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from sqlalchemy import event, update
from test_store_tiers import assert_same, kv_page

from memlayer.errors import CapacityError, CorruptionError, NotFoundError
from memlayer.stores import DiskTier, PageStore, SQLTier, TensorTier, disk_tier
from memlayer.types import Page


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The file descriptors the disk tier fsyncs, in order."""
    synced: list[int] = []
    real = disk_tier.fsync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(disk_tier, "fsync", counting)
    yield synced


def test_put_many_is_one_fsync_in_the_tier_and_through_the_store(
    tmp_path: Path, fsyncs: list[int]
) -> None:
    pages = [kv_page(f"p{i}", seed=i) for i in range(10)]
    tier = DiskTier(tmp_path / "tier")
    fsyncs.clear()
    assert tier.put_many(pages) == []
    assert len(fsyncs) == 1
    tier.close()
    with PageStore.open(ram_budget="4KiB", path=tmp_path / "store") as store:
        fsyncs.clear()
        store.put_many(pages)
        assert len(fsyncs) == 1
        fsyncs.clear()
        store.put(kv_page("one"))
        assert len(fsyncs) == 1


def test_the_default_put_many_returns_every_page_evicted() -> None:
    pages = [kv_page(f"p{i}", seed=i) for i in range(5)]
    tier = TensorTier("ram", "cpu", pages[0].nbytes * 2)
    assert [page.id for page in tier.put_many(pages)] == ["p0", "p1", "p2"]
    assert sorted(tier.ids()) == ["p3", "p4"]


@pytest.fixture
def slab_copies(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The page ids of every `TensorTier.copy_from` batch."""
    batches: list[list[str]] = []
    real = TensorTier.copy_from

    def recording(self: TensorTier, source: TensorTier, page_ids: Sequence[str]) -> list[Page]:
        batches.append(list(page_ids))
        return real(self, source, page_ids)

    monkeypatch.setattr(TensorTier, "copy_from", recording)
    return batches


def test_pages_come_up_from_ram_as_one_slab_copy_per_signature(
    slab_copies: list[list[str]],
) -> None:
    wide = [kv_page(f"w{i}", seed=i) for i in range(16)]
    narrow = [kv_page(f"n{i}", seed=i, tokens=4) for i in range(4)]
    gpu = TensorTier("gpu", "cpu", wide[0].nbytes * 8)
    with PageStore([gpu, TensorTier("ram", "cpu", None)]) as store:
        store.put_many(narrow + wide)  # everything but w8..w15 is pushed down to RAM
        picked = ["w5", "w1", "w6", "w0"]
        stacked = store.gather(picked, "k")
        assert slab_copies == [picked]
        assert torch.equal(stacked, torch.stack([wide[int(i[1:])].payload["k"] for i in picked]))
        slab_copies.clear()
        store.prefetch(["n2", "w2", "n0", "w3"]).result()
        assert slab_copies == [["n2", "n0"], ["w2", "w3"]]
        slab_copies.clear()
        ids = [f"w{i}" for i in range(16) if f"w{i}" not in gpu][:12]
        store.prefetch(ids).result()  # more than fit: 8 per step, the last ones stay
        assert [len(batch) for batch in slab_copies] == [8, 4]
        assert set(ids[8:]) <= set(gpu.ids())
        assert gpu.nbytes <= gpu.budget


def test_a_gather_keeps_the_pages_the_front_already_has() -> None:
    """Promoting the missing pages must not evict the present ones (they are touched first),
    or a gather that fits would fail."""
    pages = [kv_page(f"p{i}", seed=i) for i in range(6)]
    gpu = TensorTier("gpu", "cpu", pages[0].nbytes * 4)
    with PageStore([gpu, TensorTier("ram", "cpu", None)]) as store:
        store.put_many(pages)  # p0, p1 pushed down; p2 is the coldest in front
        assert sorted(gpu.ids()) == ["p2", "p3", "p4", "p5"]
        stacked = store.gather(["p2", "p3", "p0", "p1"], "v")
        assert torch.equal(stacked, torch.stack([pages[i].payload["v"] for i in (2, 3, 0, 1)]))
        assert sorted(gpu.ids()) == ["p0", "p1", "p2", "p3"]
        with pytest.raises(CapacityError, match="gather fewer"):
            store.gather([f"p{i}" for i in range(5)], "v")


def test_sql_reads_a_batch_with_one_query_per_500_ids(tmp_path: Path) -> None:
    tier = SQLTier(f"sqlite:///{tmp_path / 'pages.db'}")
    pages = [Page(id=f"p{i}", payload=bytes([i % 256]) * 3, kind="semantic") for i in range(1200)]
    tier.put_many(pages)
    selects: list[str] = []

    def record(conn: object, cursor: object, statement: str, *rest: object) -> None:
        if statement.startswith("SELECT"):
            selects.append(statement)

    event.listen(tier._engine, "before_cursor_execute", record)
    asked = [f"p{i}" for i in range(1199, -1, -1)] + ["p7"]  # reversed, one asked twice
    got = tier.get_many(asked)
    assert [page.id for page in got] == asked
    for page in got[:5]:
        assert_same(pages[int(page.id[1:])], page)
    assert len(selects) == 3 and tier.counters.hits == len(asked)
    with pytest.raises(NotFoundError, match="'nope'"):
        tier.get_many(["p1", "nope", "also-missing"])
    with tier._engine.begin() as conn:
        conn.execute(update(tier._table).where(tier._table.c.id == "p9").values(crc=0))
    with pytest.raises(CorruptionError, match="'p9'"):
        tier.get_many(["p8", "p9"])
    tier.close()


def test_a_page_pushed_down_while_others_come_up_still_comes_up(tmp_path: Path) -> None:
    """Promotion goes deepest tier first; a page waiting in RAM that the demotions push out
    of RAM meanwhile is looked up again and comes up from disk."""
    pages = {name: kv_page(name, seed=i) for i, name in enumerate("ABZXY")}
    size = pages["A"].nbytes
    with PageStore.open(
        gpu_budget=size * 2, gpu_device="cpu", ram_budget=size * 2, path=tmp_path / "d"
    ) as store:
        store.put_many(list(pages.values()))
        gpu, ram, _ = store.tiers
        assert sorted(gpu.ids()) == ["X", "Y"] and sorted(ram.ids()) == ["B", "Z"]
        stacked = store.gather(["B", "A"], "k")  # A's arrival pushes X into RAM, B out of it
        assert torch.equal(stacked, torch.stack([pages[i].payload["k"] for i in "BA"]))
        assert store.stats()["moved"]["disk->gpu"]["pages"] == 2
