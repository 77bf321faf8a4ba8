"""`PagedKVCache`: a transformers `Cache` whose layers are memlayer `LayerMemory` objects.

`update` stores a chunk's keys and values and hands them back; the attention function
registered by `memlayer.kvretrieval.attention` then attends over the layer's memory.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from memlayer.kvretrieval.config import KVConfig
from memlayer.kvretrieval.layer_memory import LayerMemory
from memlayer.kvretrieval.page_pool import open_kv_store
from memlayer.kvretrieval.rope import Rotary
from memlayer.kvretrieval.selectors import make_selector


class PagedKVCache(Cache):
    """Per-layer paged KV memory for one stream (batch size 1)."""

    def __init__(
        self,
        model_config: Any,
        config: KVConfig,
        rotary: Rotary,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__(layers=[])
        text_config = (
            model_config.get_text_config()
            if hasattr(model_config, "get_text_config")
            else model_config
        )
        heads = text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        selector = make_selector(config.selector, repr_topk=config.repr_topk)
        rows = config.repr_topk if config.selector == "infllm" else 2
        self.config = config
        self.calls = 0  # attention calls routed through memlayer (checked per forward)
        page_bytes = 2 * kv_heads * config.block_size * head_dim * dtype.itemsize
        step_pages = config.topk * (1 if selector.shares_selection else kv_heads)
        self.store, self._offload_folder = open_kv_store(config, device, page_bytes, step_pages)
        self.memories = [
            LayerMemory(
                config, selector, rotary, kv_heads, head_dim, rows, dtype, device, self.store, i
            )
            for i in range(text_config.num_hidden_layers)
        ]

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a chunk's keys/values [1, Hkv, T, D]; return them unchanged.

        Extra arguments (cache_kwargs, or transformers >= 5.24's `kwargs=`) are not needed.
        """
        self.memories[layer_idx].append(key_states[0], value_states[0])
        return key_states, value_states

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

    def checkpoint(self) -> list[tuple[object, ...]]:
        """Per-layer state to restore after a question."""
        return [memory.checkpoint() for memory in self.memories]

    def restore(self, state: list[tuple[object, ...]]) -> None:
        """Return every layer to a checkpoint."""
        for memory, layer_state in zip(self.memories, state, strict=True):
            memory.restore(layer_state)
