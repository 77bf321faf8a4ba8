"""The attention function memlayer registers with transformers' `AttentionInterface`.

Models call it with the layer module, queries (unrotated: memlayer runs models at position 0)
and the chunk's keys; it attends over the layer's paged memory of the cache made active for
the current forward pass with `active_cache` (a context variable, so threads never mix).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from memlayer.errors import UnsupportedModelError

ATTENTION_NAME = "memlayer"
_ACTIVE: ContextVar[Any] = ContextVar("memlayer_active_cache", default=None)


@contextmanager
def active_cache(cache: Any) -> Iterator[None]:
    """Make `cache` the memory that memlayer attention reads during a forward pass."""
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def memlayer_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over init + selected pages + local window; returns [B, T, Hq, D]."""
    cache = _ACTIVE.get()
    if cache is None:
        raise UnsupportedModelError(
            "memlayer attention runs only inside a KVSession forward pass (no active cache)"
        )
    if query.shape[0] != 1:
        raise UnsupportedModelError("KV memory handles one stream at a time (batch size 1)")
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise UnsupportedModelError(f"{type(module).__name__} does not expose layer_idx")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = cache.memories[layer].attend(query, scale)
    cache.calls += 1
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register the attention function (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, memlayer_attention)
