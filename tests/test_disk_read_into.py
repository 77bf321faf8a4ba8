"""Disk → RAM promotion reads a page's tensors straight into the RAM tier's slab.

The file's bytes land in the slot with one `preadv` (no decoded copy between) and the
checksum is verified over what arrived; a damaged page is refused and leaves no slot taken.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from memlayer.errors import CapacityError, CorruptionError, InvalidInputError, StorageError
from memlayer.stores import DiskTier, PageStore, TensorTier, disk_tier
from memlayer.types import Page

PAGE_BYTES = 2 * 4 * 16 * 8 * 2  # k and v, [4, 16, 8] bf16


def _pages(count: int) -> list[Page]:
    gen = torch.Generator().manual_seed(7)
    return [
        Page(
            id=f"layer0/{i}",
            payload={
                "k": torch.randn(4, 16, 8, generator=gen).to(torch.bfloat16),
                "v": torch.randn(4, 16, 8, generator=gen).to(torch.bfloat16),
            },
            kind="kv",
            metadata={"index": i},
        )
        for i in range(count)
    ]


def _store(tmp_path: Path) -> tuple[PageStore, TensorTier, DiskTier]:
    ram = TensorTier("ram", "cpu", 2 * PAGE_BYTES)
    disk = DiskTier(tmp_path / "disk", sync=False)
    return PageStore([ram, disk]), ram, disk


def test_pages_come_up_from_disk_exactly_without_a_decoded_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, ram, disk = _store(tmp_path)
    pages = _pages(6)
    store.put_many(pages)
    assert len(ram) == 2  # the other four are on disk alone

    def no_decoded_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("promotion decoded the page instead of reading it into the slab")

    monkeypatch.setattr(disk, "get", no_decoded_read)
    monkeypatch.setattr(disk, "get_many", no_decoded_read)
    stacked = store.gather([p.id for p in pages[:2]], "v")
    assert torch.equal(stacked, torch.stack([p.payload["v"] for p in pages[:2]]))
    for page in pages[:2]:
        held = ram.get(page.id)
        assert held.kind == "kv" and held.metadata == page.metadata
        assert held.created_at == page.created_at
        assert torch.equal(held.payload["k"], page.payload["k"])
    store.close()


def test_a_damaged_page_is_refused_and_leaves_no_slot_taken(tmp_path: Path) -> None:
    store, ram, _ = _store(tmp_path)
    pages = _pages(6)
    store.put_many(pages)
    target = pages[0]
    assert target.id not in ram
    segment = next((tmp_path / "disk").glob("segment-*.log"))
    data = bytearray(segment.read_bytes())
    at = data.find(target.payload["v"].view(torch.uint8).numpy().tobytes())
    assert at > 0
    data[at + 100] ^= 0x01
    segment.write_bytes(bytes(data))
    held = set(ram.ids())
    with pytest.raises(CorruptionError, match="checksum"):
        store.get(target.id)
    assert target.id not in ram
    assert set(ram.ids()) <= held  # nothing half-read stayed; pages evicted for it may go
    fresh = store.get(pages[1].id)[0]  # the slot it would have used serves the next page
    assert torch.equal(fresh.payload["k"], pages[1].payload["k"])
    store.close()


def test_bring_up_makes_pages_resident_together_or_refuses(tmp_path: Path) -> None:
    store, ram, _ = _store(tmp_path)
    pages = _pages(6)
    store.put_many(pages)
    ids = [page.id for page in pages]
    store.bring_up(ids[:2])
    assert all(page_id in ram for page_id in ids[:2])
    with pytest.raises(CapacityError, match="bring_up of 3 pages does not fit tier 'ram'"):
        store.bring_up(ids[:3])
    store.close()


def test_a_header_is_parsed_once_and_a_damaged_header_is_still_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the first read of a page found on disk, promotion parses no JSON; the checksum
    still covers the header's bytes, so a flipped byte there is refused."""
    pages = _pages(6)
    _, _, disk = _store(tmp_path)
    disk.put_many(pages)
    disk.close()
    store, ram, disk = _store(tmp_path)  # reopened: nothing parsed yet
    parses: list[bytes] = []
    real = disk_tier.read_header
    monkeypatch.setattr(
        disk_tier, "read_header", lambda prefix: parses.append(prefix) or real(prefix)
    )
    ids = [page.id for page in pages]
    for _ in range(3):
        for page_id in ids[:2]:
            if page_id in ram:
                ram.evict(page_id)
        store.bring_up(ids[:2])
    assert len(parses) == 2  # once per page, not once per read
    for page in pages[:2]:
        assert torch.equal(ram.get(page.id).payload["v"], page.payload["v"])
        assert ram.get(page.id).metadata == page.metadata

    segment = next((tmp_path / "disk").glob("segment-*.log"))
    data = bytearray(segment.read_bytes())
    at = data.find(b'"index":0')
    assert at > 0
    data[at + len('"index":')] = ord("7")  # still valid JSON: only the checksum can tell
    segment.write_bytes(bytes(data))
    ram.evict(ids[0])
    with pytest.raises(CorruptionError, match="checksum"):
        store.bring_up(ids[:1])
    store.close()


def _bigger_pages(count: int) -> list[Page]:
    """Pages of 64 KiB each, so that a batch of them makes several runs."""
    gen = torch.Generator().manual_seed(11)
    return [
        Page(
            id=f"p{i}",
            payload={"k": torch.randn(8, 64, 64, generator=gen).to(torch.bfloat16)},
            metadata={"index": i},
        )
        for i in range(count)
    ]


@pytest.mark.parametrize("read_threads", [1, 3])
def test_one_batch_brings_up_pages_from_many_segments_exactly_while_its_slab_grows(
    tmp_path: Path, read_threads: int
) -> None:
    """The slab grows by copying as the batch takes slots (1, 2, 4, ... rows): each page's
    bytes must land where its slot is once the batch is done, not where it was first given."""
    pages = _bigger_pages(40)
    disk = DiskTier(tmp_path / "disk", sync=False, segment_bytes=300_000, read_threads=read_threads)
    disk.put_many(pages)
    disk.evict(pages[5].id)  # a tombstone between two records: a run breaks or reads the gap
    assert len(list((tmp_path / "disk").glob("segment-*.log"))) >= 8
    ram = TensorTier("ram", "cpu", None)
    store = PageStore([ram, disk])
    wanted = [page for page in pages if page.id != pages[5].id][::-1]  # any order
    store.prefetch([page.id for page in wanted]).result()
    for page in wanted:
        held = ram.get(page.id)
        assert torch.equal(held.payload["k"], page.payload["k"]), page.id
        assert held.metadata == page.metadata
    store.close()


def test_a_batch_larger_than_the_tier_leaves_its_last_pages_resident(tmp_path: Path) -> None:
    pages = _bigger_pages(7)
    disk = DiskTier(tmp_path / "disk", sync=False)
    disk.put_many(pages)
    ram = TensorTier("ram", "cpu", 3 * pages[0].nbytes)
    store = PageStore([ram, disk])
    store.prefetch([page.id for page in pages]).result()
    assert sorted(ram.ids()) == sorted(page.id for page in pages[-3:])
    for page in pages[-3:]:
        assert torch.equal(ram.get(page.id).payload["k"], page.payload["k"])
    store.close()


def test_a_damaged_page_in_a_batch_is_refused_and_the_rest_arrive(tmp_path: Path) -> None:
    pages = _bigger_pages(8)
    disk = DiskTier(tmp_path / "disk", sync=False)
    disk.put_many(pages)
    disk.close()
    segment = next((tmp_path / "disk").glob("segment-*.log"))
    data = bytearray(segment.read_bytes())
    at = data.find(pages[3].payload["k"].view(torch.uint8).numpy().tobytes())
    data[at + 1000] ^= 0x10
    segment.write_bytes(bytes(data))
    ram = TensorTier("ram", "cpu", None)
    store = PageStore([ram, DiskTier(tmp_path / "disk", sync=False)])
    with pytest.raises(CorruptionError, match="'p3': body checksum mismatch"):
        store.prefetch([page.id for page in pages]).result()
    assert pages[3].id not in ram
    for page in pages[:3] + pages[4:]:
        assert torch.equal(ram.get(page.id).payload["k"], page.payload["k"])
    store.close()


def test_read_threads_below_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="read_threads"):
        DiskTier(tmp_path / "disk", read_threads=0)
    assert not (tmp_path / "disk").exists()


def test_a_segment_cut_short_under_an_open_tier_is_a_storage_error(tmp_path: Path) -> None:
    pages = _bigger_pages(4)
    disk = DiskTier(tmp_path / "disk", sync=False, read_threads=1)
    disk.put_many(pages)
    segment = next((tmp_path / "disk").glob("segment-*.log"))
    os.truncate(segment, segment.stat().st_size - 10)  # the last page loses its tail
    ram = TensorTier("ram", "cpu", None)
    store = PageStore([ram, disk])
    with pytest.raises(StorageError, match="'p3': short read from segment 1"):
        store.prefetch([page.id for page in pages]).result()
    assert pages[3].id not in ram
    for page in pages[:3]:
        assert torch.equal(ram.get(page.id).payload["k"], page.payload["k"])
    store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_reads_through_a_tier_its_parent_read_with(tmp_path: Path) -> None:
    """The parent's reader threads do not survive a fork: the child must not wait on them.
    (The child reads into plain buffers and compares bytes: no torch after the fork.)"""
    pages = _bigger_pages(40)  # several runs: a helper thread is asked for
    disk = DiskTier(tmp_path / "disk", sync=False)
    disk.put_many(pages)
    store = PageStore([TensorTier("ram", "cpu", None), disk])
    store.prefetch([page.id for page in pages]).result()  # the parent's pool is started
    expected = [page.payload["k"].view(torch.uint8).numpy().tobytes() for page in pages]
    buffers = [bytearray(len(data)) for data in expected]
    ids = [page.id for page in pages]
    child = os.fork()
    if child == 0:
        code = 1
        try:
            into = dict(zip(ids, buffers, strict=True))
            read = disk.read_many_into(ids, lambda pid, sig: {"k": memoryview(into[pid])})
            code = 0 if all(r is not None for r in read) and buffers == expected else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while (done := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        pytest.fail("the forked child hung reading the disk tier")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    store.close()
