"""One layer's KV memory: sink tokens, a local window, and sealed pages with summaries.

Keys arrive unrotated. Attention is split into disjoint parts merged exactly by log-sum-exp:
the local window (true relative positions, causal), the sink tokens, and the top-k selected
pages. Tokens leaving the window become sinks until `n_init` are kept, then are sealed into
`block_size` pages with a selector summary. The layer owns all of its state: checkpoint and
restore around a question, and the tensors a saved session keeps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from memlayer.errors import UnsupportedModelError
from memlayer.kernels import (
    causal_window_attention,
    merge_attention,
    paged_attention,
    select_pages,
)
from memlayer.kvretrieval.config import KVConfig
from memlayer.kvretrieval.rope import Rotary
from memlayer.kvretrieval.sealed_pages import SealedPages
from memlayer.kvretrieval.selectors import PageSelector
from memlayer.stores import DiskTier, PageStore

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

    selection_s: float = 0.0
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
    ):
        super().__init__()
        self.config = config
        self.selector = selector
        self.rotary = rotary
        self.device = device
        empty = torch.empty(geometry.kv_heads, 0, geometry.head_dim, dtype=dtype, device=device)
        self.window_k, self.window_v = empty, empty
        self.window_start = 0  # absolute position of the window's first token
        self.sink_k, self.sink_v = empty, empty
        summary_shape = (geometry.kv_heads, selector.summary_rows, geometry.head_dim)
        self.pages = SealedPages(store, f"layer{layer}", summary_shape, dtype, device)
        self.stats = LayerStats()

    @property
    def seen(self) -> int:
        """Tokens this layer has stored."""
        return self.window_start + self.window_k.shape[1]

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
        self.window_k = torch.cat([self.window_k, self.rotary.unscale(keys)], dim=1)
        self.window_v = torch.cat([self.window_v, values], dim=1)

    def attend(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention output [1, Hq, T, D] of the newest T queries (already appended keys)."""
        started = time.perf_counter()
        exact = self.config.positions == "exact"
        q_raw = self.rotary.unscale(queries)
        length = queries.shape[2]
        total = self.window_k.shape[1]
        offset = self.window_start if exact else 0
        device = queries.device
        key_pos = torch.arange(total, device=device) + offset
        q_local = self.rotary.rotate(q_raw, key_pos[total - length :])
        k_local = self.rotary.rotate(self.window_k, key_pos)
        parts = [
            causal_window_attention(
                q_local, k_local[None], self.window_v[None], scale=scale, q_start=total - length
            )
        ]
        q_memory = q_local if exact else self.memory_queries(queries)
        if self.sink_k.shape[1]:
            parts.append(
                causal_window_attention(
                    q_memory,
                    self.sink_k[None],
                    self.sink_v[None],
                    scale=scale,
                    q_start=self.sink_k.shape[1],
                )
            )
        selection = 0.0
        if self.pages.count:
            picked = time.perf_counter()
            chosen = self.select(q_memory)
            selection = time.perf_counter() - picked
            valid = chosen >= 0
            self.stats.pages_selected += int(valid.sum())
            wanted, slots = torch.unique(chosen[valid], return_inverse=True)
            keys, values = self.pages.gather(wanted.tolist())
            compact = torch.full_like(chosen, -1)
            compact[valid] = slots  # selected page -> its row among the gathered pages
            parts.append(paged_attention(q_memory, keys, values, compact, scale=scale))
        out, _ = merge_attention([p[0] for p in parts], [p[1] for p in parts])
        self._seal(q_raw[0])
        self.stats.selection_s += selection
        self.stats.attention_s += time.perf_counter() - started - selection
        self.stats.steps += 1
        return out

    def select(self, q_memory: torch.Tensor) -> torch.Tensor:
        """Top-k pages [1, Hkv, topk] for queries placed in the memory frame."""
        scores = self.selector.score(q_memory, self.pages.summaries[: self.pages.count])
        return select_pages(scores, self.config.topk)

    def memory_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Unrotated queries [1, Hq, T, D] placed where memory is read (fixed distance n_local)."""
        positions = torch.full((queries.shape[2],), self.config.n_local, device=queries.device)
        return self.rotary.rotate(self.rotary.unscale(queries), positions)

    def _seal(self, recent_queries: torch.Tensor) -> None:
        """Move tokens that left the local window into the sink tokens, then into pages: all
        the whole pages a chunk pushes out are sealed together, in one batch."""
        cfg = self.config
        excess = self.window_k.shape[1] - cfg.n_local
        room = cfg.n_init - self.sink_k.shape[1]
        if excess > 0 and room > 0:
            take = min(excess, room)
            placed = self._placed(self.window_k[:, :take], self.window_start)
            self.sink_k = torch.cat([self.sink_k, placed], dim=1)
            self.sink_v = torch.cat([self.sink_v, self.window_v[:, :take]], dim=1)
            self._drop(take)
            excess -= take
        count = max(excess, 0) // cfg.block_size
        if not count:
            return
        take = count * cfg.block_size

        def as_pages(tokens: torch.Tensor) -> torch.Tensor:  # [Hkv, N·S, D] -> [N, Hkv, S, D]
            return tokens.unflatten(1, (count, cfg.block_size)).transpose(0, 1)

        keys = as_pages(self._placed(self.window_k[:, :take], self.window_start))
        summaries = self.selector.summarize(as_pages(self.window_k[:, :take]), recent_queries)
        first = self.pages.count
        starts = [self.window_start + i * cfg.block_size for i in range(count)]
        self.pages.extend(keys, as_pages(self.window_v[:, :take]), summaries, starts)
        self.selector.sealed(first, keys, summaries)
        self._drop(take)

    def _drop(self, count: int) -> None:
        """Forget the window's first `count` tokens (now sinks or pages)."""
        self.window_k = self.window_k[:, count:]
        self.window_v = self.window_v[:, count:]
        self.window_start += count

    def _placed(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Keys as memory stores them: rotated to position 0, or to their absolute positions.

        Position 0 is the identity for plain RoPE, but scaled RoPE (YaRN, LongRoPE) multiplies
        by its attention scaling at every position, 0 included, as it does the query.
        """
        count = keys.shape[1]
        if self.config.positions == "exact":
            positions = torch.arange(start, start + count, device=keys.device)
        else:
            positions = torch.zeros(count, dtype=torch.long, device=keys.device)
        return self.rotary.rotate(keys, positions)

    def checkpoint(self) -> Checkpoint:
        """State to return to after a question, so the fed context stays intact."""
        return Checkpoint(
            self.window_k,
            self.window_v,
            self.window_start,
            self.sink_k,
            self.sink_v,
            self.pages.count,
        )

    def restore(self, state: Checkpoint) -> None:
        """Return to a checkpoint (pages sealed since then are dropped, from the selector too)."""
        self.window_k, self.window_v, self.window_start = (
            state.window_k,
            state.window_v,
            state.window_start,
        )
        self.sink_k, self.sink_v = state.sink_k, state.sink_v
        self.pages.truncate(state.pages)
        self.selector.truncate(state.pages)

    def save(self, folder: DiskTier) -> dict[str, Any]:
        """Write this layer's pages to `folder`; the tensors that rebuild the rest of it."""
        pages = self.pages
        ids = [pages.page_id(i) for i in range(pages.count)]
        for start in range(0, len(ids), 64):  # a bounded number of pages up at a time
            folder.put_many(pages.store.get(ids[start : start + 64]))
        return {
            "window_k": self.window_k,
            "window_v": self.window_v,
            "window_start": torch.tensor(self.window_start),
            "sink_k": self.sink_k,
            "sink_v": self.sink_v,
            "summaries": pages.summaries[: pages.count].clone(),
            "starts": torch.tensor(pages.starts, dtype=torch.long),
            "selector": self.selector.state(),
        }

    def load(self, saved: dict[str, Any], folder: DiskTier) -> None:
        """Rebuild this (empty) layer from what `save` returned and the pages in `folder`."""
        saved = {_SAVED_BY_0_2.get(key, key): value for key, value in saved.items()}
        self.window_k, self.window_v = saved["window_k"], saved["window_v"]
        self.window_start = int(saved["window_start"])
        self.sink_k, self.sink_v = saved["sink_k"], saved["sink_v"]
        starts = saved["starts"].tolist()
        for first in range(0, len(starts), 64):  # a bounded number of pages up at a time
            ids = [self.pages.page_id(i) for i in range(first, min(first + 64, len(starts)))]
            payloads = [page.payload for page in folder.get_many(ids)]
            self.pages.extend(
                torch.stack([payload["k"] for payload in payloads]),
                torch.stack([payload["v"] for payload in payloads]),
                saved["summaries"][first : first + len(ids)],
                starts[first : first + len(ids)],
            )
        self.selector.load_state(saved.get("selector", {}))


@dataclass(frozen=True)
class Checkpoint:
    """A layer's state before a question: its window, sinks and page count."""

    window_k: torch.Tensor
    window_v: torch.Tensor
    window_start: int
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    pages: int
