"""`PagedKVCache`: a transformers `Cache` whose layers are memlayer `LayerMemory` objects.

`update` (transformers' own) hands a chunk's keys and values to the layer, which stores
them; the attention function registered by `memlayer.kvretrieval.attention` then attends
over the layer's memory. Each layer gets its own copy of the selector.

A fixed context (fed once, then asked many questions) may be prepared for its selector once
it is fed: `regroup()` lets a clustering selector (Squeezed Attention) lay every layer's
sealed pages out again by cluster, and sample questions run inside `calibrating()` tune its
thresholds. Both are kept by `save` and need not run again after `load`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache

from memlayer.errors import InvalidInputError
from memlayer.kvretrieval.config import KVConfig
from memlayer.kvretrieval.layer_memory import Checkpoint, HeadGeometry, LayerMemory
from memlayer.kvretrieval.rope import Rotary, TokenLayout
from memlayer.kvretrieval.sealed_pages import open_kv_store
from memlayer.kvretrieval.selectors import PageSelector
from memlayer.kvretrieval.shared_pages import SlotRouter
from memlayer.stores import TensorTier

if TYPE_CHECKING:
    from memlayer.kvretrieval.fixed_context import FixedContext


class PagedKVCache(Cache):
    """Per-layer paged KV memory for one stream (batch size 1).

    Alone, the cache owns its page store. On a fixed context (`context`) it uses the
    context's store, whose front tier every session on the context shares: the context's
    pages are read in place, and this cache's own pages go to the same store under a prefix
    of its own (`session-N/layer{i}/{j}`), so a step reads both from one slab; `close`
    removes those and nothing else.

    `fingerprint`: the model's (`memlayer.kvretrieval.model.fingerprint`), so a selector with
    a trained part made for another model refuses it before anything is built.
    """

    def __init__(
        self,
        geometry: HeadGeometry,
        config: KVConfig,
        selector: PageSelector,
        rotary: Rotary,
        *,
        dtype: torch.dtype,
        device: torch.device,
        context: FixedContext | None = None,
        fingerprint: str | None = None,
    ):
        self.config = config
        self.calls = 0  # attention calls routed through memlayer (checked per forward)
        selector.check_model(geometry.layers, geometry.kv_heads, geometry.head_dim, fingerprint)
        self._offload_folder = None
        if context is None:
            page_bytes = 2 * geometry.kv_heads * config.block_size * geometry.head_dim
            page_bytes *= config.page_dtype_for(dtype).itemsize
            step_pages = config.topk * (1 if selector.shares_selection else geometry.kv_heads)
            if selector.selects_per_question:  # the pinned pages and up to topk sealed since
                step_pages *= 2
            self.store, self._offload_folder = open_kv_store(config, device, page_bytes, step_pages)
            front = self.store.tiers[0]
            assert isinstance(front, TensorTier)  # open_kv_store puts a tensor tier in front
            self.router = SlotRouter(front)
            prefix = "layer"
            bases: list[Any] = [None] * geometry.layers
        else:
            self.store, self.router = context.store, context.router
            prefix = f"{context.new_prefix()}/layer"
            bases = list(context.layers)
        self._owns_store = context is None
        self.memories = [
            LayerMemory(
                config,
                copy.deepcopy(selector),
                rotary,
                geometry,
                dtype,
                device,
                self.store,
                i,
                prefix=f"{prefix}{i}",
                context=base,
            )
            for i, base in enumerate(bases)
        ]
        for memory in self.memories:
            self.router.add(memory.pages)
        if config.prefetch:
            for layer, following in itertools.pairwise(self.memories):
                layer.pages.next = following.pages
        layers: list[Any] = list(self.memories)  # transformers types the list by its own classes
        super().__init__(layers=layers)

    def close(self) -> None:
        """Remove this cache's own pages from the store (closing the store when it is the
        cache's own); a fixed context's pages stay as they are."""
        for memory in self.memories:
            memory.pages.truncate(memory.pages.first)
            self.router.remove(memory.pages.prefix)
        if self._owns_store:
            self.store.close()
            if self._offload_folder is not None:
                self._offload_folder.cleanup()

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens stored (the same in every layer)."""
        return self.memories[layer_idx or 0].seen

    def get_mask_sizes(self, query_length: int, layer_idx: int | None = 0) -> tuple[int, int]:
        """memlayer builds its own masks; transformers' mask code is skipped."""
        return query_length, 0

    def get_query_offset(self, layer_idx: int | None = 0) -> int:
        """See get_mask_sizes."""
        return 0

    @property
    def is_compileable(self) -> bool:
        return False

    @contextmanager
    def selecting(self, topk: int) -> Iterator[None]:
        """Within the block every layer's step attends to `topk` pages (0: the sinks and the
        local window alone, as a video session encodes frames); then to what it did before."""
        previous = [memory.topk for memory in self.memories]
        for memory in self.memories:
            memory.topk = topk
        try:
            yield
        finally:
            for memory, topk_before in zip(self.memories, previous, strict=True):
                memory.topk = topk_before

    @contextmanager
    def laid_out(self, layout: TokenLayout | None) -> Iterator[None]:
        """Within the block every layer turns the chunk's queries and keys by `layout` as
        they arrive (image tokens under multimodal RoPE); None changes nothing."""
        for memory in self.memories:
            memory.layout = layout
        try:
            yield
        finally:
            for memory in self.memories:
                memory.layout = None

    @contextmanager
    def recording(self) -> Iterator[list[list[torch.Tensor]]]:
        """Within the block each layer records its steps' queries [1, Hq, T, D], placed in the
        memory frame (a retrieval pass); yields the per-layer lists."""
        recorded: list[list[torch.Tensor]] = [[] for _ in self.memories]
        for memory, queries in zip(self.memories, recorded, strict=True):
            memory.recorded = queries
        try:
            yield recorded
        finally:
            for memory in self.memories:
                memory.recorded = None

    @contextmanager
    def pinned(self, chosen: torch.Tensor) -> Iterator[None]:
        """Within the block every layer's steps attend to the pages `chosen` [k] (one
        selection for all layers and heads) and to the pages sealed after this call."""
        for memory in self.memories:
            heads = memory.window.heads
            memory.pin = (chosen.view(1, 1, -1).expand(1, heads, -1), memory.pages.count)
        try:
            yield
        finally:
            for memory in self.memories:
                memory.pin = None

    def regroup(self) -> int:
        """Regroup every layer's sealed pages as its selector lays them out (call once, after
        the fixed context is fed, before questions); the number of layers regrouped: 0 when
        the selector keeps pages as sealed. Every layer is checked first, so an error (no
        sealed pages, already regrouped) leaves all of them as they were."""
        if not self.memories[0].selector.regroups:
            return 0
        for memory in self.memories:
            memory.check_regroup()
        return sum(memory.regroup() for memory in self.memories)

    @contextmanager
    def calibrating(self) -> Iterator[None]:
        """Record every layer's memory queries within the block (sample questions run with
        `continue_ids`), then calibrate each layer's selector on its own. Nothing is
        recorded for a selector that does not calibrate; an error inside the block leaves
        the selectors as they were."""
        if not self.memories[0].selector.calibrates:
            yield
            return
        for memory in self.memories:
            memory.recorded = []
        try:
            yield
            recorded = [memory.recorded or [] for memory in self.memories]
        finally:
            for memory in self.memories:
                memory.recorded = None
        if not recorded[0]:
            raise InvalidInputError("queries", "none ran inside calibrating(): ask some first")
        for memory, queries in zip(self.memories, recorded, strict=True):
            heads, dim = memory.window.heads, queries[0].shape[-1]
            rows = torch.cat([q[0].reshape(heads, -1, dim) for q in queries], dim=1)
            memory.selector.calibrate(rows, scale=memory.recorded_scale)

    def checkpoint(self) -> list[Checkpoint]:
        """Per-layer state to restore after a question."""
        return [memory.checkpoint() for memory in self.memories]

    def restore(self, state: list[Checkpoint]) -> None:
        """Return every layer to a checkpoint."""
        for memory, layer_state in zip(self.memories, state, strict=True):
            memory.restore(layer_state)

    def stats(self) -> dict[str, Any]:
        """Pages, selections and time summed over the layers; the store's tiers and moves.

        `pages_selected` / `tokens_selected`: pages read by steps, per KV head, and the
        tokens they held; `selector`: the selectors' own counters, summed over layers.

        `selection_hit_rate`: the share of selected pages already in the front tier (GPU, or
        RAM on CPU) when a step gathered them; the rest came up from a slower tier.
        """
        memories = self.memories
        store = self.store.stats()
        gathered = sum(m.pages.gathered for m in memories)
        hits = sum(m.pages.front_hits for m in memories)
        selector: dict[str, float] = {}
        for memory in memories:
            for key, value in memory.selector.stats().items():
                selector[key] = selector.get(key, 0.0) + value
        context_pages = sum(m.pages.first for m in memories)
        read = sum(int(m.pages.context_reads) for m in memories)
        steps = sum(m.stats.steps * m.pages.first * m.window.heads for m in memories)
        return {
            "pages": sum(m.pages.count for m in memories),
            "own_pages": sum(m.pages.count - m.pages.first for m in memories),
            "context_pages": context_pages,
            # share of the context's KV (pages x KV heads) one step read, on average
            "context_read_per_step": read / steps if steps else 0.0,
            "tiers": store["tiers"],
            "moved": store["moved"],
            "pages_selected": sum(m.pages_selected for m in memories),
            "tokens_selected": sum(m.tokens_selected for m in memories),
            "selection_hit_rate": hits / gathered if gathered else 0.0,
            "attention_s": sum(m.stats.attention_s for m in memories),
            "selector": selector,
        }
