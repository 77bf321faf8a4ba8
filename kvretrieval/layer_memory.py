"""One layer's KV memory: sink tokens, a local window, and sealed pages with summaries.

Keys arrive unrotated. Attention is split into disjoint parts merged exactly by log-sum-exp:
the local window (true relative positions, causal), the sink tokens, and the top-k selected
pages. Tokens leaving the window become sinks until `n_init` are kept, then are sealed into
`block_size` pages with a selector summary. A selector with a layout (Squeezed Attention)
may regroup the sealed pages of a fixed context once (`regroup`): the same tokens, in new
pages. The layer owns all of its state: checkpoint and restore around a question, and the
tensors a saved session keeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from transformers.cache_utils import CacheLayerMixin

from memlayer.errors import InvalidInputError, UnsupportedModelError
from memlayer.kernels import decode_layer, sparse_attention, takes_bf16_products
from memlayer.kvretrieval.config import KVConfig
from memlayer.kvretrieval.rope import Rotary, TokenLayout
from memlayer.kvretrieval.sealed_pages import SealedPages
from memlayer.kvretrieval.selectors import PageSelector
from memlayer.kvretrieval.shared_pages import ContextLayer
from memlayer.kvretrieval.window import SinkBuffer, WindowBuffer
from memlayer.stores import PageStore
from memlayer.types import Page


class PageFolder(Protocol):
    """Where a saved session's pages go: a disk tier, or a database's saved-session pages."""

    def put_many(self, pages: Sequence[Page]) -> list[Page]: ...

    def get_many(self, page_ids: Sequence[str]) -> list[Page]: ...


# layer tensors as memlayer 0.2.0 named them in saved sessions
_SAVED_BY_0_2 = {
    "buffer_k": "window_k",
    "buffer_v": "window_v",
    "buffer_start": "window_start",
    "init_k": "sink_k",
    "init_v": "sink_v",
}


@dataclass
class LayerStats:
    """Counters of one layer (summed into the session's stats)."""

    attention_s: float = 0.0
    steps: int = 0
    pages_selected: int = 0


@dataclass(frozen=True)
class HeadGeometry:
    """Attention heads of a model's layers, read once from its config."""

    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @classmethod
    def of(cls, model_config: Any) -> HeadGeometry:
        text = (
            model_config.get_text_config()
            if hasattr(model_config, "get_text_config")
            else model_config
        )
        heads = text.num_attention_heads
        return cls(
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            layers=text.num_hidden_layers,
        )


class LayerMemory(CacheLayerMixin):
    """The KV memory of one attention layer (batch size 1), a transformers cache layer.

    The local window lives in preallocated buffers (`WindowBuffer`): a chunk's keys are
    written in place and rotated once, on arrival. A step reads sealed pages straight from
    the front tier's slab through the page table, so with the front tier resident (no
    budget: the default) it runs as tensor operations on the model's device, with no value
    read back to the host (`attend`).

    transformers' generic layer methods that assume one keys/values tensor (offload,
    reorder for beam search) do not apply: the layer's KV is split across sinks, window and
    pages in the PageStore, so `keys` and `values` stay None and beams are refused.
    """

    is_sliding = False

    def __init__(
        self,
        config: KVConfig,
        selector: PageSelector,
        rotary: Rotary,
        geometry: HeadGeometry,
        dtype: torch.dtype,
        device: torch.device,
        store: PageStore,
        layer: int,
        *,
        prefix: str | None = None,
        context: ContextLayer | None = None,
    ):
        """A layer whose pages are `{prefix}/{i}` in `store` (prefix: "layer{layer}").

        On a fixed context (`context`), the layer starts where the context ended: its pages
        and sinks are the context's, shared and read-only, its window a copy of the
        context's trailing window, its selector the context's saved state.
        """
        super().__init__()
        self.config = config
        self.selector = selector
        self.rotary = rotary
        heads, dim = geometry.kv_heads, geometry.head_dim
        self.window = WindowBuffer(
            config, rotary, heads, dim, dtype, device, exact=config.positions == "exact"
        )
        self.sinks = SinkBuffer(config.n_init, heads, dim, dtype, device)
        summary_shape = (heads, selector.summary_rows, dim)
        page_shape = (heads, config.block_size, dim)
        self.pages = SealedPages(
            store,
            prefix or f"layer{layer}",
            page_shape,
            summary_shape,
            dtype,
            device,
            base=context.pages if context is not None else None,
            page_dtype=config.page_dtype_for(dtype),
        )
        if context is not None:
            self.window.reset(context.window_k, context.window_v, context.window_start)
            self.sinks.share(context.sink_k, context.sink_v, context.sink_count)
            self.selector.load_state({k: v.clone() for k, v in context.selector_state.items()})
        self.stats = LayerStats()
        self.topk = config.topk  # pages a step attends to; 0 (sinks + window only) while a
        # video session encodes frames (`PagedKVCache.selecting`)
        # metadata of pages sealed together (first index, count), e.g. frame index and time
        self.labels: Callable[[int, int], list[dict[str, Any]]] | None = None
        # -- one selection per question (RetroLM; `PagedKVCache.pinned` / `.recording`) --
        # the pages [1, Hkv, k] every step attends to, and the page count when they were
        # chosen: the pages sealed since (the question's and answer's own) are attended too
        self.pin: tuple[torch.Tensor, int] | None = None
        # pages and tokens read by steps whose selection may pad (counted on the device, so a
        # step reads nothing back); other steps count pages on the host (`stats`)
        self.selected = torch.zeros(2, dtype=torch.long, device=device)
        # while a retrieval pass or a calibration runs: each step's queries [1, Hq, T, D] in
        # the memory frame, and the attention scale they were used with
        self.recorded: list[torch.Tensor] | None = None
        self.recorded_scale = 1.0
        # while a chunk of image tokens is read (multimodal RoPE): their turn from the 1-D
        # positions the memory gives them to their (time, row, column) ones (`laid_out`)
        self.layout: TokenLayout | None = None
        # the selection a CPU decode step's single kernel call makes (`_attend_fused`); None
        # takes every step part by part, through `select`
        self.fused_selection = selector.decode_selection if device.type == "cpu" else None

    @property
    def window_start(self) -> int:
        """Absolute position of the local window's first token."""
        return self.window.start

    @property
    def seen(self) -> int:
        """Tokens this layer has stored."""
        return self.window.end

    # -- transformers' cache layer interface ------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate lazily: the layer is built with its shapes."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a chunk's keys/values [1, Hkv, T, D]; return them unchanged."""
        self.append(key_states[0], value_states[0])
        return key_states, value_states

    def get_seq_length(self, *args: Any) -> int:
        return self.seen

    def get_mask_sizes(self, *args: Any) -> tuple[int, int]:
        """memlayer builds its own masks; transformers' mask code gets an empty key range."""
        query_length = args[0] if args and isinstance(args[0], int) else 0
        return query_length, 0

    def get_max_length(self) -> int:
        return -1  # no maximum: the stream grows without bound

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise UnsupportedModelError("KV memory handles one stream at a time (no beam search)")

    # -- memory -----------------------------------------------------------------------------

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add a chunk's unrotated keys/values [Hkv, T, D] at the end of the local window."""
        self.window.append(self._turned(self.rotary.unscale(keys)), values)

    def _turned(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., T, D] turned by the chunk's token layout, if it has one."""
        return x if self.layout is None else self.layout.apply(x)

    def attend(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention output [1, Hq, T, D] of the newest T queries (already appended keys),
        then sealing of what left the window."""
        started = time.perf_counter()
        q_raw = self._turned(self.rotary.unscale(queries))
        if self.recorded is not None:
            self.recorded.append(self._placed_queries(q_raw)[1])
            self.recorded_scale = scale
        out = self._attend_fused(q_raw, scale)
        if out is None:
            out = self.attend_resident(q_raw, scale)
        self.pages.prefetch_next()
        if self.pages.count and self.topk:
            taken = self._step_pages() * self.window.heads
            if not self.selector.pads_selection:
                self.stats.pages_selected += taken
            self.pages.count_resident_read(taken)
        self._seal(q_raw[0])
        self.stats.attention_s += time.perf_counter() - started
        self.stats.steps += 1
        return out

    def attend_resident(self, q_raw: torch.Tensor, scale: float) -> torch.Tensor:
        """Window + sinks + selected pages for unrotated queries [1, Hq, T, D]: tensor
        operations alone when the front tier is resident (no `.item()`, no loop over pages)."""
        window, pages = self.window, self.pages
        q_local, q_memory = self._placed_queries(q_raw)
        bf16 = self.config.attention_dtype == "bfloat16" and takes_bf16_products(q_local)
        lengths = None
        if pages.count and self.topk:
            # a selector that scores with bfloat16 products gets the queries rounded for it
            rounded = bf16 and self.selector.takes_bf16_queries
            chosen = self.select(q_memory.bfloat16() if rounded else q_memory, scale)
            padded = self.selector.pads_selection or chosen.shape[-1] > pages.count
            k_pool, v_pool, slots = pages.slots(chosen, padded)
            if pages.partial:
                lengths = pages.held(chosen)
            if self.selector.pads_selection:
                read = lengths if lengths is not None else (chosen >= 0) * pages.page_size
                self.selected += torch.stack([(chosen >= 0).sum(), read.sum()])
        else:
            k_pool = v_pool = window.keys().new_empty(0, window.heads, 1, q_raw.shape[-1])
            slots = torch.empty(1, window.heads, 0, dtype=torch.long, device=q_raw.device)
            padded = False
        return sparse_attention(
            q_local,
            window.keys()[None],
            window.values()[None],
            q_memory,
            self.sinks.keys()[None],
            self.sinks.values()[None],
            k_pool,
            v_pool,
            slots,
            scale=scale,
            padded=padded,
            page_lengths=lengths,
            bf16_products=bf16,
        )

    def _attend_fused(self, q_raw: torch.Tensor, scale: float) -> torch.Tensor | None:
        """`attend_resident`'s step in one kernel call (`decode_layer`), where one takes it:
        a CPU decode step over this layer's own resident pages, none pinned, chosen by a
        selector whose selection the kernel has. None: take the step part by part."""
        pages, window = self.pages, self.window
        if (
            self.fused_selection is None
            or not (pages.count and self.topk)
            or self.pin is not None
            or pages.first
            or pages.partial
            or not pages.resident
        ):
            return None
        slab = pages.front.slab(pages.signature)
        if slab is None:
            return None
        tokens = q_raw.shape[-2]
        local_at = window.end - tokens - window.base
        memory_at = None if window.exact else self.config.n_local
        upto = max(local_at + tokens, 0 if memory_at is None else memory_at + 1)
        return decode_layer(
            q_raw,
            self.rotary.tables(upto, q_raw.dtype),
            local_at,
            memory_at,
            self.fused_selection,
            pages.summaries[: pages.count],
            self.topk,
            pages.table,
            window.keys(),
            window.values(),
            self.sinks.keys(),
            self.sinks.values(),
            slab.fields["k"],
            slab.fields["v"],
            scale=scale,
        )

    def _placed_queries(self, q_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unrotated queries placed for the local window and for memory (the same tensor when
        positions are exact)."""
        q_local = self.window.rotate_queries(q_raw)
        return q_local, q_local if self.window.exact else self.memory_queries(q_raw)

    def select(self, q_memory: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """The selector's pages [1, Hkv, topk] for queries placed in the memory frame, for
        attention scaled by `scale` (None: 1/√head_dim); or the pinned pages (one selection
        per question) and the newest `topk` pages sealed since."""
        if self.pin is not None:
            return self._pinned(*self.pin)
        summaries = self.pages.summaries[: self.pages.count]
        if scale is None:
            scale = q_memory.shape[-1] ** -0.5
        return self.selector.select(q_memory, summaries, self.topk, scale=scale)

    @property
    def pages_selected(self) -> int:
        """Pages (per KV head) read by steps so far."""
        return self.stats.pages_selected + int(self.selected[0])

    @property
    def tokens_selected(self) -> int:
        """Tokens (per KV head) of the pages read by steps so far."""
        return self.stats.pages_selected * self.pages.page_size + int(self.selected[1])

    def check_regroup(self) -> None:
        """Raise InvalidInputError if `regroup` cannot run now (nothing is changed)."""
        if self.pages.count == 0:
            raise InvalidInputError(
                "context",
                "has no sealed pages to regroup: feed more than n_init + n_local tokens",
            )
        self.selector.check_layout()

    def regroup(self) -> bool:
        """Lay the sealed pages out again as the selector says (once per fixed context): read
        every page, let the selector index the tokens and place them, write the new pages.
        Returns False (nothing done) when the selector keeps pages as sealed."""
        self.check_regroup()
        pages, size = self.pages, self.config.block_size
        keys, values = pages.read()  # [N, Hkv, S, D], every page full (none regrouped yet)
        starts = torch.tensor(pages.starts, device=keys.device)
        positions = (starts[:, None] + torch.arange(size, device=keys.device)).reshape(-1)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [N, Hkv, S, D] -> [Hkv, N·S, D]
            return t.transpose(0, 1).flatten(1, 2)

        layout = self.selector.layout(tokens(keys), positions, size)
        if layout is None:
            return False
        heads = torch.arange(keys.shape[1], device=keys.device).view(1, -1, 1)
        used = (layout.order >= 0).unsqueeze(-1)

        def gather(t: torch.Tensor) -> torch.Tensor:  # [Hkv, T, D] -> [P, Hkv, S, D]
            return torch.where(used, t[heads, layout.order.clamp(min=0)], 0)

        pages.replace(
            gather(tokens(keys)), gather(tokens(values)), layout.summaries, layout.lengths
        )
        return True

    def _pinned(self, chosen: torch.Tensor, count: int) -> torch.Tensor:
        """The pinned pages, then the newest `topk` of the pages sealed since the pin (host
        integers only: no value read back from the device)."""
        if self.pages.count <= count:
            return chosen
        since = torch.arange(
            max(count, self.pages.count - self.topk), self.pages.count, device=chosen.device
        )
        return torch.cat([chosen, since.expand(1, chosen.shape[1], -1)], dim=-1)

    def _step_pages(self) -> int:
        """Pages one step attends to per KV head."""
        if self.pin is None:
            return min(self.topk, self.pages.count)
        chosen, count = self.pin
        return chosen.shape[-1] + min(self.topk, max(self.pages.count - count, 0))

    def memory_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Unrotated queries [1, Hq, T, D] placed where memory is read (fixed distance n_local)."""
        return self.rotary.rotate_to(queries, self.config.n_local)

    def _seal(self, recent_queries: torch.Tensor) -> None:
        """Move tokens that left the local window into the sink tokens, then into pages: all
        the whole pages a chunk pushes out are sealed together, in one batch."""
        cfg, window = self.config, self.window
        excess = window.length - cfg.n_local
        room = cfg.n_init - self.sinks.count
        if excess > 0 and room > 0:
            take = min(excess, room)
            raw = window.raw_keys()[:, :take]
            self.sinks.add(self._placed(raw, window.start), window.values()[:, :take])
            window.drop(take)
            excess -= take
        count = max(excess, 0) // cfg.block_size
        if not count:
            return
        take = count * cfg.block_size

        def as_pages(tokens: torch.Tensor) -> torch.Tensor:  # [Hkv, N·S, D] -> [N, Hkv, S, D]
            return tokens.unflatten(1, (count, cfg.block_size)).transpose(0, 1)

        raw = window.raw_keys()[:, :take]
        keys = as_pages(self._placed(raw, window.start))
        summaries = self.selector.summarize(as_pages(raw), recent_queries)
        first = self.pages.count
        starts = [window.start + i * cfg.block_size for i in range(count)]
        labels = self.labels(first, count) if self.labels is not None else None
        self.pages.extend(keys, as_pages(window.values()[:, :take]), summaries, starts, labels)
        self.selector.sealed(first, keys, summaries)
        window.drop(take)

    def _placed(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Keys as memory stores them: rotated to position 0, or to their absolute positions.

        Position 0 is the identity for plain RoPE, but scaled RoPE (YaRN, LongRoPE) multiplies
        by its attention scaling at every position, 0 included, as it does the query.
        """
        if self.config.positions == "exact":
            return self.rotary.rotate(keys, start)
        return self.rotary.rotate_to(keys, 0)

    def unplaced(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Inverse of `_placed`: sink or page keys [..., n, D] placed from position `start`
        back to unrotated keys, to be placed again elsewhere (a video session's answer)."""
        if self.config.positions == "exact":
            return self.rotary.unrotate(keys, start)
        return self.rotary.unscale(keys)

    def checkpoint(self) -> Checkpoint:
        """State to return to after a question, so the fed context stays intact (copies of
        the window: its buffers are written in place; sinks and pages are only appended, so
        their counts suffice)."""
        return Checkpoint(
            self.window.raw_keys().clone(),
            self.window.values().clone(),
            self.window.start,
            self.sinks.count,
            self.pages.count,
        )

    def restore(self, state: Checkpoint) -> None:
        """Return to a checkpoint (pages sealed since then are dropped, from the selector too)."""
        self.window.reset(state.window_k, state.window_v, state.window_start)
        self.sinks.truncate(state.sinks)
        self.pages.truncate(state.pages)
        self.selector.truncate(state.pages)

    def save(self, folder: PageFolder) -> dict[str, Any]:
        """Write this layer's pages to `folder`; the tensors that rebuild the rest of it."""
        pages = self.pages
        ids = [pages.page_id(i) for i in range(pages.count)]
        for start in range(0, len(ids), 64):  # a bounded number of pages up at a time
            folder.put_many(pages.store.get(ids[start : start + 64]))
        return {
            "window_k": self.window.raw_keys().clone(),
            "window_v": self.window.values().clone(),
            "window_start": torch.tensor(self.window.start),
            "sink_k": self.sinks.keys().clone(),
            "sink_v": self.sinks.values().clone(),
            "summaries": pages.summaries[: pages.count].clone(),
            "starts": torch.tensor(pages.starts, dtype=torch.long),
            "lengths": pages.lengths[: pages.count].clone(),
            "selector": self.selector.state(),
        }

    def load(self, saved: dict[str, Any], folder: PageFolder) -> None:
        """Rebuild this (empty) layer from what `save` returned and the pages in `folder`."""
        saved = {_SAVED_BY_0_2.get(key, key): value for key, value in saved.items()}
        self.window.reset(saved["window_k"], saved["window_v"], int(saved["window_start"]))
        self.sinks.reset(saved["sink_k"], saved["sink_v"])
        starts = saved["starts"].tolist()
        summaries = self.selector.adopt_summaries(saved["summaries"])
        lengths = saved.get("lengths")  # absent before regrouped pages: every page full
        for first in range(0, len(starts), 64):  # a bounded number of pages up at a time
            ids = [self.pages.page_id(i) for i in range(first, min(first + 64, len(starts)))]
            pages = folder.get_many(ids)
            payloads = [cast(Mapping[str, Any], page.payload) for page in pages]
            self.pages.extend(
                torch.stack([payload["k"] for payload in payloads]),
                torch.stack([payload["v"] for payload in payloads]),
                summaries[first : first + len(ids)],
                starts[first : first + len(ids)],
                [page.metadata for page in pages],
                None if lengths is None else lengths[first : first + len(ids)],
            )
        self.selector.load_state(saved.get("selector", {}))


@dataclass(frozen=True)
class Checkpoint:
    """A layer's state before a question: its window, sink count and page count."""

    window_k: torch.Tensor
    window_v: torch.Tensor
    window_start: int
    sinks: int
    pages: int
