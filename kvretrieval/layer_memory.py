"""One layer's KV memory: sink tokens, a local window, and sealed pages with summaries.

Keys arrive unrotated. Attention is split into disjoint parts merged exactly by log-sum-exp:
the local window (true relative positions, causal), the sink tokens, and the top-k selected
pages. Tokens leaving the window are sealed into `block_size` pages with a selector summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from memlayer.kernels import (
    causal_window_attention,
    merge_attention,
    paged_attention,
    select_pages,
)
from memlayer.kvretrieval.config import KVConfig
from memlayer.kvretrieval.page_pool import PagePool
from memlayer.kvretrieval.rope import Rotary
from memlayer.kvretrieval.selectors import PageSelector
from memlayer.stores import PageStore


@dataclass
class LayerStats:
    """Counters of one layer (summed into the session's stats)."""

    selection_s: float = 0.0
    attention_s: float = 0.0
    steps: int = 0
    pages_selected: int = 0


class LayerMemory:
    """The KV memory of one attention layer (batch size 1)."""

    def __init__(
        self,
        config: KVConfig,
        selector: PageSelector,
        rotary: Rotary,
        kv_heads: int,
        head_dim: int,
        summary_rows: int,
        dtype: torch.dtype,
        device: torch.device,
        store: PageStore,
        layer: int,
    ):
        self.config = config
        self.selector = selector
        self.rotary = rotary
        empty = torch.empty(kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.buffer_k, self.buffer_v = empty, empty
        self.buffer_start = 0  # absolute position of buffer[0]
        self.init_k, self.init_v = empty, empty
        self.pool = PagePool(
            store, f"layer{layer}", (kv_heads, summary_rows, head_dim), dtype, device
        )
        self.stats = LayerStats()

    @property
    def seen(self) -> int:
        """Tokens this layer has stored."""
        return self.buffer_start + self.buffer_k.shape[1]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add a chunk's unrotated keys/values [Hkv, T, D] at the end of the local window."""
        self.buffer_k = torch.cat([self.buffer_k, self.rotary.unscale(keys)], dim=1)
        self.buffer_v = torch.cat([self.buffer_v, values], dim=1)

    def attend(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention output [1, Hq, T, D] of the newest T queries (already appended keys)."""
        started = time.perf_counter()
        exact = self.config.positions == "exact"
        q_raw = self.rotary.unscale(queries)
        length = queries.shape[2]
        total = self.buffer_k.shape[1]
        offset = self.buffer_start if exact else 0
        device = queries.device
        key_pos = torch.arange(total, device=device) + offset
        q_local = self.rotary.rotate(q_raw, key_pos[total - length :])
        k_local = self.rotary.rotate(self.buffer_k, key_pos)
        parts = [
            causal_window_attention(
                q_local, k_local[None], self.buffer_v[None], scale=scale, q_start=total - length
            )
        ]
        q_memory = q_local if exact else self.memory_queries(queries)
        if self.init_k.shape[1]:
            parts.append(
                causal_window_attention(
                    q_memory,
                    self.init_k[None],
                    self.init_v[None],
                    scale=scale,
                    q_start=self.init_k.shape[1],
                )
            )
        selection = 0.0
        if self.pool.count:
            picked = time.perf_counter()
            chosen = self.select(q_memory)
            selection = time.perf_counter() - picked
            valid = chosen >= 0
            self.stats.pages_selected += int(valid.sum())
            wanted, slots = torch.unique(chosen[valid], return_inverse=True)
            keys, values = self.pool.gather(wanted.tolist())
            compact = torch.full_like(chosen, -1)
            compact[valid] = slots  # selected page -> its row in the gathered pool
            parts.append(paged_attention(q_memory, keys, values, compact, scale=scale))
        out, _ = merge_attention([p[0] for p in parts], [p[1] for p in parts])
        self._seal(q_raw[0])
        self.stats.selection_s += selection
        self.stats.attention_s += time.perf_counter() - started - selection
        self.stats.steps += 1
        return out

    def select(self, q_memory: torch.Tensor) -> torch.Tensor:
        """Top-k pages [1, Hkv, topk] for queries placed in the memory frame."""
        scores = self.selector.score(q_memory, self.pool.summaries[: self.pool.count])
        return select_pages(scores, self.config.topk)

    def memory_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Unrotated queries [1, Hq, T, D] placed where memory is read (fixed distance n_local)."""
        positions = torch.full((queries.shape[2],), self.config.n_local, device=queries.device)
        return self.rotary.rotate(self.rotary.unscale(queries), positions)

    def _seal(self, recent_queries: torch.Tensor) -> None:
        """Move tokens that left the local window into the sink tokens, then into pages."""
        cfg = self.config
        while True:
            excess = self.buffer_k.shape[1] - cfg.n_local
            room = cfg.n_init - self.init_k.shape[1]
            if excess > 0 and room > 0:
                take = min(excess, room)
                self.init_k = torch.cat(
                    [self.init_k, self._placed(self.buffer_k[:, :take], self.buffer_start)], dim=1
                )
                self.init_v = torch.cat([self.init_v, self.buffer_v[:, :take]], dim=1)
            elif excess >= cfg.block_size:
                take = cfg.block_size
                keys = self.buffer_k[:, :take]
                summary = self.selector.summarize(keys, recent_queries)
                self.pool.append(
                    self._placed(keys, self.buffer_start),
                    self.buffer_v[:, :take],
                    summary,
                    self.buffer_start,
                )
            else:
                return
            self.buffer_k = self.buffer_k[:, take:]
            self.buffer_v = self.buffer_v[:, take:]
            self.buffer_start += take

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

    def checkpoint(self) -> tuple[object, ...]:
        """State to return to after a question, so the fed context stays intact."""
        return (
            self.buffer_k,
            self.buffer_v,
            self.buffer_start,
            self.init_k,
            self.init_v,
            self.pool.count,
        )

    def restore(self, state: tuple[object, ...]) -> None:
        """Return to a checkpoint (pages sealed since then are dropped)."""
        self.buffer_k, self.buffer_v, self.buffer_start, self.init_k, self.init_v, count = state  # type: ignore[assignment]
        self.pool.truncate(int(count))  # type: ignore[call-overload]
