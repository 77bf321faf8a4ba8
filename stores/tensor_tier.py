"""GPU and RAM tiers: pages held as tensors on one device, in slabs, under a byte budget.

Pages whose payloads have the same names, dtypes and shapes (a signature: every KV page
of a layer has one) share a slab: one tensor per name, [slots, *shape]. A batch of pages
is then read with one `index_select` per name, never a Python loop per page. Slabs grow
by doubling while the budget allows and are released when empty; the bytes a tier
reports are the bytes its slabs reserve, so a budget is a bound on device memory.

A RAM slab past RESERVE_FROM reserves address space ahead (`RESERVE_FRACTION` of the
machine's memory, within the budget). Linux backs it only where it is written, so the slab
grows as a longer view of the same memory instead of a copy of all its pages into a new one.
A page-locked slab (a RAM tier behind a GPU) reserves up to all of the machine's memory and
locks only the rows in use, again as it grows (`stores/pinned.py`). Where the reservation is
refused (strict overcommit), the slab grows by copying.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from memlayer.errors import CapacityError, InvalidInputError, NotFoundError
from memlayer.stores.codec import check_payload
from memlayer.stores.pinned import (
    device_rows,
    lock_rows,
    pinned_empty,
    pinned_reserve,
    range_starts,
    word_dtype,
)
from memlayer.stores.policy import POLICIES
from memlayer.stores.tier import PromotionStep, Tier
from memlayer.types import Page

RESERVE_FRACTION = 0.25  # of physical memory: the address space a RAM slab reserves ahead
RESERVE_FROM = 64 << 20  # bytes: smaller slabs double by copying (cheap, and no reserve each)
# scattered host rows reach a GPU by one kernel over the bus (True), or by the copy engine
# run by run (False): on an H200 the kernel was 1.8x faster alone, but took the SMs from
# the model, and a 128K InfLLM session prefilled 18% slower with it (RESULTS.md)
GATHER_OVER_BUS = False
Signature = tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]
SlotListener = Callable[[list[str], list[int]], None]  # page ids, their slots now (-1: left)


def signature(payload: dict[str, torch.Tensor]) -> Signature:
    """Names, dtypes and shapes of a tensor payload: pages with equal ones share a slab."""
    return tuple((name, t.dtype, tuple(t.shape)) for name, t in payload.items())


def non_blocking(target: torch.device) -> bool:
    """Copies into a GPU run async (stream-ordered); copies into host memory wait, so nothing
    on the CPU reads a host slot before its bytes have landed (a page-locked tier's own
    writes from the GPU are the exception: `TensorTier._settle`)."""
    return target.type != "cpu"


def device_index(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    """Row indices as a tensor on `device`. Onto a GPU they go from page-locked memory without
    waiting: a copy from pageable memory waits for every kernel queued before it."""
    index = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":
        return index
    return index.pin_memory().to(device, non_blocking=True)


def slot_bytes(sig: Signature) -> int:
    """Bytes one page of this signature takes in a slab."""
    return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in sig)


@dataclass
class Slab:
    """Pages of one signature: a tensor per payload name with one row (slot) per page."""

    fields: dict[str, torch.Tensor]  # [capacity, *shape]: views of `reserved` when reserved
    slot_bytes: int
    free: list[int] = field(default_factory=list)
    used: int = 0
    reserved: dict[str, torch.Tensor] | None = None  # [rows >= capacity, *shape], unwritten past
    _bytes: dict[str, tuple[torch.Tensor, Any]] = field(default_factory=dict)  # field, its rows

    @property
    def capacity(self) -> int:
        return next(iter(self.fields.values())).shape[0]

    def row_bytes(self, name: str, slot: int) -> memoryview:
        """The bytes of one slot of a CPU field, writable in place (each field's rows are
        seen as bytes once, until the slab grows into a new field)."""
        tensor = self.fields[name]
        cached = self._bytes.get(name)
        if cached is None or cached[0] is not tensor:
            rows = tensor.view(torch.uint8).reshape(tensor.shape[0], -1).numpy()
            cached = self._bytes[name] = (tensor, rows)
        view: memoryview = cached[1][slot].data
        return view


class _SlotBytes(Mapping[str, memoryview]):
    """The bytes of a slot's row in each field of its slab, looked up when read: a slab that
    grows later (by copying) moves its fields, and rows taken before then must follow."""

    def __init__(self, slabs: dict[Signature, Slab], sig: Signature, slot: int) -> None:
        self._slabs, self._sig, self._slot = slabs, sig, slot

    def __getitem__(self, name: str) -> memoryview:
        return self._slabs[self._sig].row_bytes(name, self._slot)

    def __iter__(self) -> Iterator[str]:
        return iter(self._slabs[self._sig].fields)

    def __len__(self) -> int:
        return len(self._slabs[self._sig].fields)


class TensorTier(Tier):
    """Pages as tensors on `device` (the GPU tier on CUDA, the RAM tier on CPU).

    `budget` None means unbounded; `pin` (default: when CUDA is available) pins host slabs
    so copies to the GPU run asynchronously at full speed. Promotion from another tensor
    tier copies slab to slab (`copy_from`); a gather is one `index_select`.
    """

    def __init__(
        self,
        name: str,
        device: str | torch.device,
        budget: int | None,
        *,
        policy: str = "lru",
        pin: bool | None = None,
    ) -> None:
        super().__init__()
        if budget is not None and budget <= 0:
            raise InvalidInputError(f"{name}.budget", "must be positive", budget)
        self.name = name
        self.device = torch.device(device)
        self.budget = budget
        self.pin = torch.cuda.is_available() and self.device.type == "cpu" if pin is None else pin
        self.policy = POLICIES.create(policy)
        self._slabs: dict[Signature, Slab] = {}
        self._slots: dict[str, tuple[Signature, int]] = {}
        self._blobs: dict[str, bytes] = {}
        self._headers: dict[str, Page] = {}
        self._stream: Any = None  # the CUDA side stream prefetches copy on, made on first use
        self._landing: dict[Any, Any] = {}  # CUDA stream -> event after its last copy in here
        self._listeners: list[SlotListener] = []

    # -- Tier -----------------------------------------------------------------------------

    def accepts(self, page: Page) -> bool:
        return self.device.type == "cpu" or not isinstance(page.payload, (bytes, bytearray))

    @property
    def nbytes(self) -> int:
        slabs = sum(slab.capacity * slab.slot_bytes for slab in self._slabs.values())
        return slabs + sum(len(blob) for blob in self._blobs.values())

    def __contains__(self, page_id: object) -> bool:
        return page_id in self._headers

    def __len__(self) -> int:
        return len(self._headers)

    def ids(self) -> Iterator[str]:
        return iter(list(self._headers))

    def put(self, page: Page) -> list[Page]:
        check_payload(page)
        if not self.accepts(page):
            raise InvalidInputError("page.payload", f"tier {self.name} holds tensors, not bytes")
        size = page.nbytes
        if self.budget is not None and size > self.budget:
            raise CapacityError(
                f"page {page.id!r} needs {size} bytes; tier {self.name!r} budget is {self.budget}"
            )
        if page.id in self:
            self.evict(page.id)
        evicted: list[Page] = []
        if isinstance(page.payload, (bytes, bytearray)):
            while self.budget is not None and self.nbytes + size > self.budget:
                evicted.append(self._pop_victim())
            self._blobs[page.id] = bytes(page.payload)
        else:
            sig = signature(dict(page.payload))
            while (slot := self._allocate(sig)) is None:
                evicted.append(self._pop_victim())
            self._write(sig, [page], [slot])
            return evicted
        self._headers[page.id] = dataclasses.replace(page, payload=b"")
        self.policy.touch(page.id)
        return evicted

    def put_many(self, pages: Sequence[Page]) -> list[Page]:
        """Store pages; new tensor pages of one signature (a layer's sealed pages) are
        written as a batch: free slots first, then the slots of as many of the coldest pages
        of that signature as the rest need, evicted together (read with one gather per
        payload name); one stacked copy per payload name and run of consecutive slots, and
        their slots reported in one call. Pages that fit neither way go one by one."""
        sig = self._batch_signature(pages)
        if sig is None:
            return super().put_many(pages)
        slots = self._take_slots(sig, len(pages))
        evicted = self._evict_batch(sig, len(pages) - len(slots))
        slots += self._take_slots(sig, len(pages) - len(slots))
        slots.sort()  # freed slots come back in any order: ascending, they copy in runs
        if slots:
            self._write(sig, pages[: len(slots)], slots)
        return evicted + super().put_many(pages[len(slots) :])

    def _take_slots(self, sig: Signature, count: int) -> list[int]:
        """Up to `count` free slots for pages of `sig` (growing its slab within budget)."""
        slots: list[int] = []
        while len(slots) < count and (slot := self._allocate(sig)) is not None:
            slots.append(slot)
        return slots

    def _evict_batch(self, sig: Signature, count: int) -> list[Page]:
        """Evict up to `count` of the coldest pages, while they are tensor pages of `sig`,
        and return them: their payloads read with one gather per name, slots freed, and the
        moves reported in one call."""
        ids: list[str] = []
        while len(ids) < count:
            victim = self.policy.victim()
            held = self._slots.get(victim) if victim is not None else None
            if victim is None or held is None or held[0] != sig:
                break
            self.policy.remove(victim)
            ids.append(victim)
        if not ids:
            return []
        self._settle()
        fields = self._slabs[sig].fields
        index = device_index([self._slots[pid][1] for pid in ids], self.device)
        gathered = {name: field.index_select(0, index) for name, field in fields.items()}
        pages = []
        for row, page_id in enumerate(ids):
            header = self._headers.pop(page_id)
            payload = {name: tensor[row] for name, tensor in gathered.items()}
            pages.append(dataclasses.replace(header, payload=payload))
            self._free(sig, self._slots.pop(page_id)[1])
        self._moved(ids, [-1] * len(ids))
        return pages

    def _write(self, sig: Signature, pages: Sequence[Page], slots: list[int]) -> None:
        """Copy new pages into their slots (one stacked copy per payload name and run of
        consecutive slots; a lone page, one copy) and record them: the one place a tensor
        page enters this tier by `put` or `put_many`."""
        payloads = [page.payload for page in pages if isinstance(page.payload, dict)]
        slab = self._slabs[sig]
        landing = self._lands_async(payloads)
        async_ = landing or non_blocking(self.device)
        breaks = {row for field_ in slab.fields.values() for row in range_starts(field_)}
        for first, count in _slot_runs(slots, breaks):
            for name, field_ in slab.fields.items():
                rows = field_[slots[first] : slots[first] + count]
                sources = [payload[name] for payload in payloads[first : first + count]]
                devices = {t.device for t in sources}
                stacked = _consecutive_rows(sources)
                if stacked is not None:  # already stacked (pages evicted together): one copy
                    rows.copy_(stacked, non_blocking=async_)
                elif count == 1 or len(devices) > 1:
                    for row, tensor in zip(rows, sources, strict=True):
                        row.copy_(tensor, non_blocking=async_)
                elif devices == {self.device}:
                    torch.stack(sources, out=rows)
                else:  # stacked where they are, then one copy across
                    rows.copy_(torch.stack(sources), non_blocking=async_)
        if landing:
            self._mark_landing()
        for page, slot in zip(pages, slots, strict=True):
            self._slots[page.id] = (sig, slot)
            self._headers[page.id] = dataclasses.replace(page, payload=b"")
            self.policy.touch(page.id)
        self._moved([page.id for page in pages], slots)

    def _lands_async(self, payloads: list[dict[str, torch.Tensor]]) -> bool:
        """Whether copies of these payloads into this tier may run without waiting: GPU
        tensors into a page-locked host slab (the GPU's queue goes on while they land, and
        `_settle` waits for them before the CPU reads this tier)."""
        return (
            self.device.type == "cpu"
            and self.pin
            and any(t.is_cuda for payload in payloads for t in payload.values())
        )

    def _mark_landing(self) -> None:
        """Record that copies into this host tier are in flight on the current stream."""
        stream = torch.cuda.current_stream()
        event = torch.cuda.Event()
        event.record(stream)
        self._landing[stream] = event

    def _settle(self) -> None:
        """Wait for this host tier's copies from the GPU still in flight (before the CPU reads
        its slabs, copies from them elsewhere, or frees them)."""
        while self._landing:
            self._landing.popitem()[1].synchronize()

    def _batch_signature(self, pages: Sequence[Page]) -> Signature | None:
        """The signature shared by `pages` when they can be written as one batch: tensor
        payloads, valid, of one signature, each within budget, none held here or repeated."""
        if not pages or len({page.id for page in pages}) != len(pages):
            return None
        sigs = set()
        for page in pages:
            check_payload(page)
            if not isinstance(page.payload, dict) or page.id in self:
                return None
            if self.budget is not None and page.nbytes > self.budget:
                return None  # put raises the capacity error
            sigs.add(signature(page.payload))
        return sigs.pop() if len(sigs) == 1 else None

    def get(self, page_id: str) -> Page:
        if page_id not in self:
            self.counters.misses += 1
            raise NotFoundError("page", page_id)
        self.counters.hits += 1
        self.policy.touch(page_id)
        return self._page(page_id)

    def evict(self, page_id: str) -> None:
        if page_id not in self:
            raise NotFoundError("page", page_id)
        self.policy.remove(page_id)
        del self._headers[page_id]
        if self._blobs.pop(page_id, None) is not None:
            return
        sig, slot = self._slots.pop(page_id)
        self._moved([page_id], [-1])
        self._free(sig, slot)

    def close(self) -> None:
        self._settle()
        self._slabs.clear()
        self._slots.clear()
        self._blobs.clear()
        self._headers.clear()

    def touch(self, page_ids: Sequence[str]) -> None:
        """Mark pages as just used in the eviction policy, without reading them."""
        missing = [page_id for page_id in page_ids if page_id not in self]
        if missing:
            raise NotFoundError("page", missing[0])
        for page_id in page_ids:
            self.policy.touch(page_id)

    def promote(self, source: Tier, page_ids: Sequence[str]) -> Iterator[PromotionStep]:
        """From another tensor tier, pages of one payload signature move slab to slab
        (`copy_from`), as many per step as the budget holds (of more pages than fit, the last
        ones stay); bytes pages and other sources go the generic way (`Tier.promote`)."""
        if not isinstance(source, TensorTier):
            if self.device.type == "cpu" and hasattr(source, "read_many_into"):
                yield from self._read_from(source, page_ids)
            else:
                yield from super().promote(source, page_ids)
            return
        batches: dict[Signature, list[str]] = {}
        blobs: list[str] = []
        for page_id in dict.fromkeys(page_ids):
            sig = source.signature_of(page_id)
            if sig is None:
                blobs.append(page_id)
            else:
                batches.setdefault(sig, []).append(page_id)
        yield from super().promote(source, blobs)
        for sig, ids in batches.items():
            size = slot_bytes(sig)
            step = len(ids) if self.budget is None else max(self.budget // size, 1)
            for start in range(0, len(ids), step):
                chunk = ids[start : start + step]
                yield PromotionStep(chunk, len(chunk) * size, self.copy_from(source, chunk))

    def _read_from(self, source: Any, page_ids: Sequence[str]) -> Iterator[PromotionStep]:
        """Promotion from a tier that reads pages straight into slab rows (`read_many_into`,
        the disk tier): the file's bytes land in the slots, with no decoded copy between, as
        many pages per batch as the tier holds. Pages it cannot read that way (bytes
        payloads) go the generic way; a page refused (damaged) gives its slot back, and its
        error is raised once the pages read with it have arrived."""
        pending = list(dict.fromkeys(page_ids))
        while pending:
            step, generic, refused, pending = self._read_batch(source, pending)
            yield step
            if generic:
                yield from super().promote(source, generic)
            if refused is not None:
                raise refused

    def _read_batch(
        self, source: Any, page_ids: list[str]
    ) -> tuple[PromotionStep, list[str], Exception | None, list[str]]:
        """One `read_many_into` of as many of `page_ids` as the tier holds: the step, the
        pages to read the generic way, the first error, and the pages left for next time."""
        evicted: list[Page] = []
        taken: dict[str, tuple[Signature, int]] = {}
        left: list[str] = []  # the batch filled the tier before these

        def slot_for(page_id: str, sig: Signature) -> Mapping[str, memoryview] | None:
            if page_id in self:
                self.evict(page_id)
            while (slot := self._allocate(sig)) is None:
                if taken and self.policy.victim() is None:
                    left.append(page_id)
                    return None
                evicted.append(self._pop_victim())
            taken[page_id] = (sig, slot)
            return _SlotBytes(self._slabs, sig, slot)

        try:
            results = source.read_many_into(page_ids, slot_for)
        except BaseException:
            for sig, slot in taken.values():  # no slot ever held a page: give them back
                self._free(sig, slot)
            raise
        arrived: list[str] = []
        generic: list[str] = []
        refused: Exception | None = None
        later = set(left)
        for page_id, result in zip(page_ids, results, strict=True):
            if isinstance(result, Exception):
                self._free(*taken[page_id])
                refused = refused or result
            elif result is not None:
                self._slots[page_id] = taken[page_id]
                self._headers[page_id] = result
                self.policy.touch(page_id)
                arrived.append(page_id)
            elif page_id not in later:
                generic.append(page_id)
        self._moved(arrived, [self._slots[page_id][1] for page_id in arrived])
        moved = sum(slot_bytes(self._slots[page_id][0]) for page_id in arrived)
        return PromotionStep(arrived, moved, evicted), generic, refused, left

    @contextmanager
    def prefetching(self) -> Iterator[None]:
        """On CUDA, prefetch copies run on this tier's side stream (from pinned host memory,
        overlapping the caller's compute) and are waited for on exit."""
        if self.device.type != "cuda":
            yield
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        # copies may overwrite slots of evicted pages: wait for the work already queued on
        # the device's default stream, which may still be reading them
        self._stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(self._stream):
            yield
        self._stream.synchronize()

    def copy_from(self, source: TensorTier, page_ids: Sequence[str]) -> list[Page]:
        """Copy pages of one payload signature from another tensor tier as one batch
        (see `copy_rows`). Returns the pages evicted to make room, as `put` does: the
        coldest of that signature read together (`_evict_batch`), not one copy each."""
        if source is self:
            raise InvalidInputError("source", "must be another tier")
        ids = list(dict.fromkeys(page_ids))
        if not ids:
            return []
        if self.device.type == "cpu":
            source._settle()  # read by the CPU; a GPU's copies from it queue behind its landing
        src_slab, src_slots = source._slot_list(ids)
        by_slot = sorted(zip(src_slots, ids, strict=True))  # source order: longest runs
        src_slots, ids = [slot for slot, _ in by_slot], [page_id for _, page_id in by_slot]
        sig = source._slots[ids[0]][0]
        needed = len(ids) * src_slab.slot_bytes
        if self.budget is not None and needed > self.budget:
            raise CapacityError(
                f"{len(ids)} pages need {needed} bytes; tier {self.name!r} budget is {self.budget}"
            )
        for page_id in ids:
            if page_id in self:
                self.evict(page_id)
        slots = self._take_slots(sig, len(ids))
        evicted = self._evict_batch(sig, len(ids) - len(slots))
        slots += self._take_slots(sig, len(ids) - len(slots))
        while len(slots) < len(ids):  # the coldest pages are of other signatures
            slot = self._allocate(sig)
            if slot is None:
                evicted.append(self._pop_victim())
            else:
                slots.append(slot)
        slots.sort()  # ascending slots for ascending sources: runs copy as one slice
        slab = self._slabs[sig]
        for name, src in src_slab.fields.items():
            copy_rows(slab.fields[name], slots, src, src_slots)
        for page_id, slot in zip(ids, slots, strict=True):
            self._slots[page_id] = (sig, slot)
            self._headers[page_id] = source._headers[page_id]
            self.policy.touch(page_id)
        self._moved(ids, slots)
        return evicted

    # -- slots: for callers that keep a page table on the device ---------------------------

    def watch(self, listener: SlotListener) -> None:
        """Call `listener(page_ids, slots)` whenever pages take slots here (a batch written
        together comes as one call), and with slot -1 when one leaves (evicted, demoted or
        deleted). Listeners run under the store's lock and must not call back into the tier."""
        self._listeners.append(listener)

    def slab(self, sig: Signature) -> Slab | None:
        """The slab of pages with this payload signature (None while there are none): read
        `slab.fields[name][slot]` for a slot `watch` reported. A slab that grows is a new
        tensor with the same slots, so read it again after pages arrive."""
        self._settle()
        return self._slabs.get(sig)

    def _moved(self, page_ids: list[str], slots: list[int]) -> None:
        for listener in self._listeners:
            listener(page_ids, slots)

    # -- batch reads ----------------------------------------------------------------------

    def gather(self, page_ids: Sequence[str], name: str) -> torch.Tensor:
        """Tensor `name` of many pages stacked [len(ids), *shape]: one gather on the device."""
        slab, slots = self.locate(page_ids)
        self._settle()
        if name not in slab.fields:
            raise InvalidInputError("name", f"is not a tensor of these pages: {list(slab.fields)}")
        return slab.fields[name].index_select(0, slots)

    def locate(self, page_ids: Sequence[str]) -> tuple[Slab, torch.Tensor]:
        """The slab holding these pages (one signature) and their slot indices on the device."""
        slab, slots = self._slot_list(page_ids)
        for pid in page_ids:
            self.policy.touch(pid)
        self.counters.hits += len(page_ids)
        self._settle()
        return slab, device_index(slots, self.device)

    def signature_of(self, page_id: str) -> Signature | None:
        """The payload signature of a page held as tensors here; None for a bytes page."""
        held = self._slots.get(page_id)
        if held is None and page_id not in self:
            raise NotFoundError("page", page_id)
        return held[0] if held else None

    # -- internals ------------------------------------------------------------------------

    def _slot_list(self, page_ids: Sequence[str]) -> tuple[Slab, list[int]]:
        missing = [pid for pid in page_ids if pid not in self._slots]
        if missing:
            raise NotFoundError("page", missing[0])
        sigs = {self._slots[pid][0] for pid in page_ids}
        if len(sigs) != 1:
            raise InvalidInputError("page_ids", "must name pages of one payload signature")
        return self._slabs[sigs.pop()], [self._slots[pid][1] for pid in page_ids]

    def _page(self, page_id: str) -> Page:
        header = self._headers[page_id]
        if page_id in self._blobs:
            return dataclasses.replace(header, payload=self._blobs[page_id])
        sig, slot = self._slots[page_id]
        self._settle()
        payload = {n: t[slot].clone() for n, t in self._slabs[sig].fields.items()}
        return dataclasses.replace(header, payload=payload)

    def _pop_victim(self) -> Page:
        victim = self.policy.victim()
        if victim is None:  # unreachable while size <= budget; kept as a clear failure
            raise CapacityError(f"tier {self.name!r} has nothing left to evict")
        page = self._page(victim)
        self.evict(victim)
        return page

    def _free(self, sig: Signature, slot: int) -> None:
        """Give a slot back to its slab (released with its last page)."""
        slab = self._slabs[sig]
        slab.used -= 1
        if slab.used == 0:
            self._settle()  # no copy lands in memory freed
            del self._slabs[sig]
        else:
            slab.free.append(slot)

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A slab field not yet written: page-locked for a host tier in front of a GPU, else
        on the tier's device. A RAM slab keeps 4 KB pages: asking Linux for 2 MB ones sends
        each first touch through direct compaction (THP's default `defrag=madvise`), and no
        in-situ A/B has shown decode gaining from them."""
        if self.pin and self.device.type == "cpu":
            return pinned_empty(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _allocate(self, sig: Signature) -> int | None:
        """A free slot for a page of `sig`, growing its slab within budget; None when full."""
        slab = self._slabs.get(sig)
        if slab is not None and slab.free:
            slab.used += 1
            return slab.free.pop()
        capacity = slab.capacity if slab else 0
        room = self.budget - self.nbytes if self.budget is not None else 2**62
        size = slot_bytes(sig)
        headroom = room // max(size, 1)
        grown = capacity + min(max(capacity, 1), headroom)
        if grown <= capacity:
            return None
        reserved = slab.reserved if slab is not None else None
        if reserved is None or next(iter(reserved.values())).shape[0] < grown:
            reserved = self._reserve(sig, grown, capacity + headroom)
            if slab is not None:
                self._settle()
                for name, tensor in reserved.items():
                    tensor[:capacity].copy_(slab.fields[name])
        fields = {name: tensor[:grown] for name, tensor in reserved.items()}
        for tensor in reserved.values():
            lock_rows(tensor, grown)
        if slab is None:
            slab = self._slabs[sig] = Slab(fields, size)
        slab.fields = fields
        slab.reserved = reserved
        slab.free.extend(range(grown - 1, capacity, -1))
        slab.used += 1
        return capacity

    def _reserve(self, sig: Signature, rows: int, most: int) -> dict[str, torch.Tensor]:
        """Fields of at least `rows` slots: on a RAM tier, as many more (up to `most`) as
        RESERVE_FRACTION of physical memory holds (all of it when page-locked: only the rows
        in use are locked), address space written only as used."""

        def fields(count: int) -> dict[str, torch.Tensor]:
            return {name: self._empty((count, *shape), dtype) for name, dtype, shape in sig}

        size = max(slot_bytes(sig), 1)
        if self.device.type != "cpu" or rows * size < RESERVE_FROM:
            return fields(rows)
        fraction = 1.0 if self.pin else RESERVE_FRACTION
        count = max(rows, min(most, int(_physical_bytes() * fraction) // size))
        try:
            if self.pin:
                return {name: pinned_reserve((count, *shape), dtype) for name, dtype, shape in sig}
            return fields(count)
        except (RuntimeError, OSError):  # address space refused (strict overcommit): no reserve
            return fields(rows)


def copy_rows(
    dst: torch.Tensor, dst_rows: list[int], src: torch.Tensor, src_rows: list[int]
) -> None:
    """dst[dst_rows] = src[src_rows]. Per stretch of consecutive destination rows, a slice
    copy where the source rows are consecutive too, else one `index_select` into the slice;
    on a GPU, rows in several stretches go as one gather and one scatter. Across devices,
    one slice copy per run of rows consecutive on both sides, except from a page-locked host
    slab to a GPU, where rows in several runs are gathered over the bus by one kernel."""
    pairs = sorted(zip(dst_rows, src_rows, strict=True))
    if dst.device != src.device:
        runs = _runs(pairs, {*range_starts(dst), *range_starts(src)})
        words = min(word_dtype(dst), word_dtype(src), key=lambda dtype: dtype.itemsize)
        bus = GATHER_OVER_BUS and len(runs) > 1
        seen = device_rows(src, dst.device, words) if bus else None
        if seen is None:
            for dst_start, src_start, length in runs:
                dst[dst_start : dst_start + length].copy_(
                    src[src_start : src_start + length], non_blocking=non_blocking(dst.device)
                )
            return
        _gather_on_gpu(_words(dst, words), seen, pairs)
        return
    stretches = _stretches(pairs)
    if len(stretches) > 1 and dst.device.type == "cuda":
        _gather_on_gpu(dst, src, pairs)
        return
    for dst_start, sources in stretches:
        target = dst[dst_start : dst_start + len(sources)]
        if sources == list(range(sources[0], sources[0] + len(sources))):
            target.copy_(src[sources[0] : sources[0] + len(sources)])
        else:
            torch.index_select(src, 0, device_index(sources, src.device), out=target)


def _gather_on_gpu(dst: torch.Tensor, src: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """dst[d] = src[s] for the (d, s) `pairs` (sorted, d unique) as kernels alone: one gather
    into the destination rows where they are one stretch, else a gather and a scatter."""
    sources = device_index([row for _, row in pairs], dst.device)
    first = pairs[0][0]
    if pairs[-1][0] - first == len(pairs) - 1:
        torch.index_select(src, 0, sources, out=dst[first : first + len(pairs)])
    else:
        targets = device_index([row for row, _ in pairs], dst.device)
        dst.index_copy_(0, targets, src.index_select(0, sources))


def _words(tensor: torch.Tensor, words: torch.dtype) -> torch.Tensor:
    """A contiguous slab field's rows as [rows, row bytes / word] of the integer type `words`."""
    return tensor.view(tensor.shape[0], -1).view(torch.uint8).view(words)


def _consecutive_rows(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The stretch of one contiguous tensor whose rows, in order, `tensors` are (as the
    payloads of pages evicted together are), else None: then they need stacking."""
    first, base = tensors[0], tensors[0]._base
    if len(tensors) < 2 or base is None or not base.is_contiguous():
        return None
    for i, tensor in enumerate(tensors):
        if (
            tensor._base is not base
            or tensor.dtype != base.dtype
            or tensor.shape != first.shape
            or not tensor.is_contiguous()
            or tensor.data_ptr() != first.data_ptr() + i * first.nbytes
        ):
            return None
    start = (first.data_ptr() - base.data_ptr()) // base.element_size()
    flat = base.view(-1)[start : start + len(tensors) * first.numel()]
    return flat.view(len(tensors), *first.shape)


def _stretches(pairs: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """(first destination row, source rows) per stretch of consecutive destination rows."""
    stretches: list[tuple[int, list[int]]] = []
    for dst_row, src_row in pairs:
        if stretches and dst_row == stretches[-1][0] + len(stretches[-1][1]):
            stretches[-1][1].append(src_row)
        else:
            stretches.append((dst_row, [src_row]))
    return stretches


def _runs(pairs: list[tuple[int, int]], breaks: Collection[int] = ()) -> list[tuple[int, int, int]]:
    """(dst start, src start, length) of the stretches where both rows step by one, each
    ending before a row in `breaks` (where a locked range begins, on either side)."""
    runs: list[tuple[int, int, int]] = []
    for dst_row, src_row in pairs:
        if runs and dst_row not in breaks and src_row not in breaks:
            dst_start, src_start, length = runs[-1]
            if dst_row == dst_start + length and src_row == src_start + length:
                runs[-1] = (dst_start, src_start, length + 1)
                continue
        runs.append((dst_row, src_row, 1))
    return runs


def _slot_runs(slots: list[int], breaks: Collection[int] = ()) -> list[tuple[int, int]]:
    """(first position, length) of each stretch of `slots` that steps by one, each ending
    before a slot in `breaks`."""
    runs: list[tuple[int, int]] = []
    for i, slot in enumerate(slots):
        if runs and slot == slots[i - 1] + 1 and slot not in breaks:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _physical_bytes() -> int:
    """The machine's physical memory (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
