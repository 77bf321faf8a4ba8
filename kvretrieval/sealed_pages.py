"""One layer's sealed pages: summaries resident for scoring, keys and values in the PageStore.

Selection reads only the summaries; the payloads of the pages that win are gathered from
whichever tier holds them (GPU, RAM, or offloaded to disk) into one stacked tensor per step.
A page may hold fewer than its S rows for a KV head (a regrouped page holds one cluster's
keys): `lengths` says how many, and the step's attention masks the rest.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from memlayer.errors import InvalidInputError
from memlayer.kvretrieval.config import KVConfig
from memlayer.kvretrieval.shared_pages import ContextPages, write_slots
from memlayer.stores import PageStore, StoreConfig, Tier, TierConfig, build_tiers
from memlayer.stores.tensor_tier import Signature, TensorTier
from memlayer.types import Page


def open_kv_store(
    config: KVConfig,
    device: torch.device,
    page_bytes: int,
    step_pages: int,
    *,
    below: Tier | None = None,
) -> tuple[PageStore, tempfile.TemporaryDirectory[str] | None]:
    """The session's page store (and the temporary offload folder it owns, if any): a tier
    on the model's device when it is a GPU, RAM, then, when RAM is bounded or `offload_path`
    is given, a disk tier there (or in a temporary folder) that does not fsync, then `below`
    (a fixed context's read-only pages) when given.

    Each bounded front tier must hold the `step_pages` pages one layer's step gathers.
    """
    cuda = device.type == "cuda"
    if config.gpu_budget is not None and not cuda:
        raise InvalidInputError("gpu_budget", "needs a model on a CUDA device")
    need = step_pages * page_bytes
    for field, budget in (("gpu_budget", config.gpu_budget), ("ram_budget", config.ram_budget)):
        if budget is not None and budget < need:
            raise InvalidInputError(
                field,
                f"must hold the {step_pages} pages one step attends to: {need} bytes "
                f"(one page is {page_bytes} bytes)",
                budget,
            )
    tiers: list[dict[str, Any]] = []
    if cuda:
        tiers.append(
            {"kind": "tensor", "name": "gpu", "device": device, "budget": config.gpu_budget}
        )
    tiers.append({"kind": "tensor", "name": "ram", "device": "cpu", "budget": config.ram_budget})
    owned = None
    if config.offload_path is not None or config.ram_budget is not None:
        folder = config.offload_path
        if folder is None:
            owned = tempfile.TemporaryDirectory(prefix="memlayer-kv-")
            folder = Path(owned.name)
        # offload is a cache (save() is durable), so its writes are not fsync'ed
        tiers.append({"kind": "disk", "path": folder, "sync": False})
    if below is None:
        return PageStore.open(tiers=tiers), owned
    built = build_tiers(StoreConfig(tiers=[TierConfig.model_validate(t) for t in tiers]))
    return PageStore([*built, below]), owned


class SealedPages:
    """Sealed pages of one layer; page `i` is stored as `{prefix}/{i}` with tensors k and v
    in `page_dtype` (the model's `dtype` unless given: `KVConfig.page_dtype`).

    `table` (on the layer's device) maps page index -> slot in the front tier's slab, -1
    for a page not there; the front tier reports every move (`SlotRouter`), so a step reads
    selected pages straight from the slab by slot, with no host lookup.

    On a fixed context (`base`), pages 0 .. base.count - 1 are the context's, read-only and
    shared with every other session on it (page `i` is `base.page_id(i)`, its slot in
    `base.table`); this layer's own pages follow from index `base.count`, under `prefix`,
    and `table` holds their slots only. `summaries` starts as the context's own tensor and
    becomes a copy the first time this layer seals a page of its own.
    `lengths` [pages, Hkv] (on the device) holds each page's used rows per KV head, shared
    with the context like `summaries`; `partial` is True once some page holds fewer than S
    (a regrouped context's cluster pages).
    """

    def __init__(
        self,
        store: PageStore,
        prefix: str,
        page_shape: Sequence[int],
        summary_shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
        *,
        base: ContextPages | None = None,
        page_dtype: torch.dtype | None = None,
    ):
        self.store = store
        self.prefix = prefix
        self.front = store.tiers[0]
        if not isinstance(self.front, TensorTier):
            raise InvalidInputError("tiers", "the KV page store's front tier must hold tensors")
        shape = tuple(page_shape)
        self.page_dtype = page_dtype or dtype  # keys and values; summaries stay in `dtype`
        self.signature: Signature = (("k", self.page_dtype, shape), ("v", self.page_dtype, shape))
        self.page_size = shape[1]
        self.base = base
        self.first = base.count if base is not None else 0  # index of the first own page
        if base is not None:
            self.summaries = base.summaries  # shared until an own page is sealed
            self.lengths = base.lengths  # likewise
            self.partial = base.partial
            self.starts: list[int] = list(base.starts)
            self.table = torch.full((1,), -1, dtype=torch.long, device=device)
        else:
            self.summaries = torch.empty(0, *summary_shape, dtype=dtype, device=device)
            self.lengths = torch.empty(0, shape[0], dtype=torch.long, device=device)
            self.partial = False
            self.starts = []
            self.table = torch.empty(0, dtype=torch.long, device=device)
        # (page, KV head) pairs of the context read by steps, counted on the device
        self.context_reads = torch.zeros((), dtype=torch.long, device=device)
        self.gathered = 0  # pages read for attention
        self.front_hits = 0  # of those, pages already in the front tier
        self.next: SealedPages | None = None  # the next layer's pages, to prefetch for
        self.picked: list[int] = []  # pages the last bounded step brought up

    @property
    def count(self) -> int:
        """Pages sealed so far (the context's, then this layer's own)."""
        return len(self.starts)

    @property
    def resident(self) -> bool:
        """Every page is in the front tier and stays there (it has no budget, so it never
        evicts; a context's pages come up on demand until all of them are there)."""
        return self.front.budget is None and (self.base is None or self.base.all_in_front)

    def page_id(self, index: int) -> str:
        """The store id of page `index`."""
        if index < self.first:
            assert self.base is not None
            return self.base.page_id(index)
        return f"{self.prefix}/{index}"

    def moved(self, indices: list[int], slots: list[int]) -> None:
        """Own pages `indices` now sit in front-tier `slots` (-1: it left the front tier)."""
        size = self.table.shape[0]
        pairs = [(i - self.first, s) for i, s in zip(indices, slots, strict=True)]
        pairs = [(own, s) for own, s in pairs if 0 <= own < size]
        write_slots(self.table, [own for own, _ in pairs], [s for _, s in pairs])

    def extend(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        summaries: torch.Tensor,
        starts: list[int],
        labels: Sequence[dict[str, Any]] | None = None,
        lengths: torch.Tensor | None = None,
    ) -> None:
        """Seal pages: keys/values [N, Hkv, S, D] to the store in one batch, summaries
        [N, Hkv, R, D] kept here, `starts` their first tokens' absolute positions (-1: not
        one span), `labels` each page's metadata (stored with it in every tier), `lengths`
        [N, Hkv] their used rows (None: all S; given, read once on the host, so not in a
        step)."""
        first, count = self.count, len(starts)
        needed = first + count
        if needed > self.summaries.shape[0]:  # a context's summaries are copied here, once
            size = max(16, needed, 2 * self.summaries.shape[0])
            grown = self.summaries.new_empty((size, *self.summaries.shape[1:]))
            grown[:first] = self.summaries[:first]
            self.summaries = grown
            held = self.lengths.new_full((size, self.lengths.shape[1]), self.page_size)
            held[:first] = self.lengths[:first]
            self.lengths = held
        own_needed = needed - self.first
        if own_needed > self.table.shape[0]:
            size = max(16, own_needed, 2 * self.table.shape[0])
            table = self.table.new_full((size,), -1)
            table[: first - self.first] = self.table[: first - self.first]
            self.table = table
        self.summaries[first:needed] = summaries
        if lengths is None:
            self.lengths[first:needed] = self.page_size
        else:
            self.lengths[first:needed] = lengths
            self.partial = self.partial or bool((lengths < self.page_size).any())
        self.starts.extend(starts)
        keys, values = keys.to(self.page_dtype), values.to(self.page_dtype)
        self.store.put_many(
            [
                Page(
                    id=self.page_id(first + i),
                    payload={"k": keys[i], "v": values[i]},
                    metadata=dict(labels[i]) if labels is not None else {},
                )
                for i in range(count)
            ]
        )

    def slots(
        self, chosen: torch.Tensor, padded: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The front slab's keys and values [slots, Hkv, S, D] and the slots [1, Hkv, k] of
        the pages `chosen` [1, Hkv, k] (-1 kept as -1), with the pages brought up first.
        `padded` says whether `chosen` may hold -1 (None: only when k exceeds the pages).

        With a resident front tier this is tensor operations alone on the device. With a
        bounded one, the chosen pages come to the host once (one small read), the missing
        ones are promoted in one batch, and the pages read are marked as used.
        """
        if not self.resident:
            self._bring_up(chosen)
        slab = self.front.slab(self.signature)
        assert slab is not None  # a sealed page is in the front tier (brought up above)
        if self.first:
            return slab.fields["k"], slab.fields["v"], self._slots_on_context(chosen)
        if padded is None:
            padded = chosen.shape[-1] > self.count
        if not padded:  # no -1 among them: a top-k of enough pages
            return slab.fields["k"], slab.fields["v"], self.table[chosen]
        picked = self.table[chosen.clamp(min=0)]
        return slab.fields["k"], slab.fields["v"], torch.where(chosen >= 0, picked, -1)

    def held(self, chosen: torch.Tensor) -> torch.Tensor:
        """Used rows [1, Hkv, k] of the pages `chosen` [1, Hkv, k] per KV head (0 for -1)."""
        heads = torch.arange(chosen.shape[1], device=chosen.device).view(1, -1, 1)
        return torch.where(chosen >= 0, self.lengths[chosen.clamp(min=0), heads], 0)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every page's keys and values, [N, Hkv, S, D] each, read through the store in
        batches (whatever tier holds them); for a one-time regroup, not for a step."""
        keys, values = [], []
        for first in range(0, self.count, 64):
            ids = [self.page_id(i) for i in range(first, min(first + 64, self.count))]
            for page in self.store.get(ids):
                like = self.summaries  # the model's dtype and device
                keys.append(page.payload["k"].to(like.device, like.dtype))
                values.append(page.payload["v"].to(like.device, like.dtype))
        return torch.stack(keys), torch.stack(values)

    def replace(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        summaries: torch.Tensor,
        lengths: torch.Tensor,
    ) -> None:
        """Drop every page and seal these in their place (a regrouped layout: no page is one
        span of positions, so their starts are -1)."""
        self.truncate(0)
        self.extend(keys, values, summaries, [-1] * keys.shape[0], lengths=lengths)

    def _slots_on_context(self, chosen: torch.Tensor) -> torch.Tensor:
        """Slots of `chosen` pages, the context's from its shared table and the own ones from
        this table; marks the context's pages read (tensor operations only)."""
        base = self.base
        assert base is not None
        first = self.first
        safe = chosen.clamp(min=0)
        from_context = (chosen >= 0) & (chosen < first)
        slots = torch.where(
            from_context,
            base.table[safe.clamp(max=first - 1)],
            self.table[(safe - first).clamp(min=0, max=self.table.shape[0] - 1)],
        )
        marked = torch.where(from_context, chosen, first).flatten()
        base.touched.index_fill_(0, marked, True)
        self.context_reads.add_(from_context.sum())
        return torch.where(chosen >= 0, slots, -1)

    def _bring_up(self, chosen: torch.Tensor) -> None:
        indices = sorted(set(chosen[chosen >= 0].tolist()))
        ids = [self.page_id(i) for i in indices]
        # every prefetch done first: one still running could evict the pages this step is
        # about to read and write other pages into their slots
        self.store.wait()
        self.front_hits += sum(page_id in self.front for page_id in ids)
        self.gathered += len(ids)
        self.store.bring_up(ids)
        self.picked = indices

    def prefetch_next(self) -> None:
        """Start bringing up the pages the next layer picked at its last step (queries move
        little from one token to the next), while this layer computes. Called once this
        step's attention is under way: what the prefetch evicts is no longer needed here, and
        on CUDA its copies wait for the work already queued."""
        following = self.next
        if following is not None and following.picked:
            self.store.prefetch([following.page_id(i) for i in following.picked])

    def count_resident_read(self, pages: int) -> None:
        """Count `pages` read straight from a resident front tier (every one a hit)."""
        if self.resident:
            self.gathered += pages
            self.front_hits += pages

    def truncate(self, count: int) -> None:
        """Forget own pages from index `count` on (their payloads leave the store); a
        context's pages are never dropped."""
        if count < self.first:
            raise InvalidInputError("count", f"must keep the context's {self.first} pages", count)
        for index in range(count, self.count):
            self.store.delete(self.page_id(index))
        del self.starts[count:]
        if count == 0:
            self.partial = False
