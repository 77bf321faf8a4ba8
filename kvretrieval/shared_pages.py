"""Page tables kept in step with a front tier, and a fixed context's pages shared by sessions.

Every step reads selected pages straight from the front tier's slab by slot, through a page
table on the device. `SlotRouter` is the one listener of a front tier: it hands each move
(`TensorTier.watch`) to the table that owns the page, found by the page id's prefix (the
id without its last `/index`). One front tier serves many tables: every layer of a session,
and, for a fixed context (`memlayer.KVContext`), the context's layers and the own pages of
every session opened on it.

`ContextPages` is one layer of a fixed context, read-only: its summaries, its pages' start
positions and its slot table, shared by all the sessions on the context (never copied per
session), and which of its pages any session has read.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from memlayer.stores import TensorTier


class PageTable(Protocol):
    """Anything that keeps slots of the pages under one id prefix."""

    prefix: str

    def moved(self, indices: list[int], slots: list[int]) -> None: ...


def write_slots(table: torch.Tensor, indices: list[int], slots: list[int]) -> None:
    """table[indices] = slots with no host-to-device copy: one `arange` per run of pages
    whose indices and slots both step by one (a batch sealed together), one `fill_` per run
    of pages that left together (slot -1) or per page alone (a kernel argument, not a
    synchronous copy)."""
    first = 0
    for i in range(1, len(indices) + 1):
        if i < len(indices) and indices[i] == indices[i - 1] + 1:
            stepped = slots[i] == slots[i - 1] + 1 and slots[first] >= 0
            if stepped or slots[i] == slots[first] == -1:
                continue
        start, count = indices[first], i - first
        if count == 1 or slots[first] == -1:
            table[start : start + count].fill_(slots[first])
        else:
            torch.arange(slots[first], slots[first] + count, out=table[start : start + count])
        first = i


class SlotRouter:
    """Routes a front tier's slot moves to the page tables registered by id prefix.

    Tables are held weakly, so a session dropped without `close` is freed at once (the
    tier, which outlives it, keeps no reference to its pages).
    """

    def __init__(self, front: TensorTier):
        self._tables: dict[str, weakref.ref[PageTable]] = {}
        tables = self._tables

        def moved(page_ids: list[str], slots: list[int]) -> None:  # holds the dict only
            by_prefix: dict[str, tuple[list[int], list[int]]] = {}
            for page_id, slot in zip(page_ids, slots, strict=True):
                prefix, _, index = page_id.rpartition("/")
                indices, taken = by_prefix.setdefault(prefix, ([], []))
                indices.append(int(index))
                taken.append(slot)
            for prefix, (indices, taken) in by_prefix.items():
                ref = tables.get(prefix)
                table = ref() if ref is not None else None
                if table is not None:
                    table.moved(indices, taken)

        front.watch(moved)

    def add(self, table: PageTable) -> None:
        """Send the moves of pages `{table.prefix}/{index}` to `table`."""
        self._tables[table.prefix] = weakref.ref(table)

    def remove(self, prefix: str) -> None:
        """Stop routing the moves of pages under `prefix`."""
        self._tables.pop(prefix, None)


class ContextPages:
    """The sealed pages of one layer of a fixed context: page `i` is `{prefix}/{i}`.

    Read-only for the sessions on the context: they read `summaries` (scoring), `lengths`
    (rows used per page and KV head: a regrouped context's cluster pages are partly filled)
    and `table` (slots of the pages in the front tier, -1 for a page not there) and never
    write them.
    `touched[i]` records that a session read page `i` (the last entry takes the reads of
    other pages, so marking is one scatter with no host read).
    """

    def __init__(
        self,
        prefix: str,
        summaries: torch.Tensor,
        starts: Sequence[int],
        device: torch.device,
        lengths: torch.Tensor,
        page_size: int,
    ):
        self.prefix = prefix
        self.summaries = summaries
        self.lengths = lengths.to(device=device, dtype=torch.long)  # [pages, Hkv] rows used
        self.partial = bool((self.lengths < page_size).any())  # some page is partly filled
        self.starts = list(starts)
        self.table = torch.full((len(self.starts),), -1, dtype=torch.long, device=device)
        self.touched = torch.zeros(len(self.starts) + 1, dtype=torch.bool, device=device)
        self._up = bytearray(len(self.starts))  # 1 where the page is in the front tier
        self.in_front = 0

    @property
    def count(self) -> int:
        """Pages of this layer of the context."""
        return len(self.starts)

    @property
    def all_in_front(self) -> bool:
        """Every page of this layer is in the front tier (a step then needs no host read
        when the front tier has no budget, since then it never evicts)."""
        return self.in_front == self.count

    def page_id(self, index: int) -> str:
        return f"{self.prefix}/{index}"

    def moved(self, indices: list[int], slots: list[int]) -> None:
        """Pages `indices` now sit in front-tier `slots` (-1: it left the front tier)."""
        pairs = [(i, s) for i, s in zip(indices, slots, strict=True) if i < self.count]
        for index, slot in pairs:
            up = int(slot >= 0)
            self.in_front += up - self._up[index]
            self._up[index] = up
        write_slots(self.table, [i for i, _ in pairs], [s for _, s in pairs])

    def touched_count(self) -> int:
        """Pages of this layer that some session has read (one host read)."""
        return int(self.touched[: self.count].sum())


@dataclass(frozen=True)
class ContextLayer:
    """Everything one layer of a fixed context holds, shared read-only by its sessions:
    the pages, the sinks (buffers of capacity `n_init`, the first `sink_count` tokens), the
    trailing window (unrotated keys and values [Hkv, n, D] from absolute `window_start`,
    which each session copies, since it appends to it) and the selector's saved state."""

    pages: ContextPages
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    sink_count: int
    window_k: torch.Tensor
    window_v: torch.Tensor
    window_start: int
    selector_state: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes this layer keeps resident besides its pages."""
        tensors = (self.sink_k, self.sink_v, self.window_k, self.window_v)
        summaries = self.pages.summaries
        return sum(t.nbytes for t in tensors) + summaries.nbytes + self.pages.table.nbytes
