"""A fixed context opened in this process: its layers, and the page store its sessions share.

The context's pages stay where they were persisted (a disk folder, a database) behind a
read-only tier; a front tier (RAM, or GPU on CUDA, with an optional budget) above it takes
them up as sessions select them. Only the small tensors come into memory on open: every
layer's summaries, page positions, sinks, trailing window and selector state. Each session
(`PagedKVCache(context=...)`) reads those in place and puts its own pages in the same store
under an id prefix of its own.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch

from memlayer.errors import InvalidInputError
from memlayer.kvretrieval.config import KVConfig
from memlayer.kvretrieval.layer_memory import HeadGeometry
from memlayer.kvretrieval.sealed_pages import open_kv_store
from memlayer.kvretrieval.selectors import PageSelector
from memlayer.kvretrieval.shared_pages import ContextLayer, ContextPages, SlotRouter
from memlayer.stores import PageStore, TensorTier
from memlayer.stores.readonly_tier import PageSource, ReadOnlyTier

_SAVED_KEYS = ("window_k", "window_v", "window_start", "sink_k", "sink_v", "summaries", "starts")


class FixedContext:
    """The layers of a fixed context (`ContextLayer`), its page store and slot router."""

    def __init__(
        self,
        layers: Sequence[ContextLayer],
        store: PageStore,
        router: SlotRouter,
        owned: tempfile.TemporaryDirectory[str] | None,
    ):
        self.layers = list(layers)
        self.store = store
        self.router = router
        self._owned = owned
        self._sessions = itertools.count(1)

    @classmethod
    def open(
        cls,
        saved: Sequence[dict[str, Any]],
        source: Callable[[Sequence[str]], PageSource],
        *,
        config: KVConfig,
        selector: PageSelector,
        geometry: HeadGeometry,
        dtype: torch.dtype,
        device: torch.device,
    ) -> FixedContext:
        """The context whose layers `LayerMemory.save` returned (`saved`) and whose pages
        are `layer{i}/{j}` in `source(ids)`. InvalidInputError when the layers do not fit
        the model (their count, or a missing tensor)."""
        if len(saved) != geometry.layers:
            raise InvalidInputError(
                "path", f"holds {len(saved)} layers; the model has {geometry.layers}"
            )
        for layer in saved:
            missing = [key for key in _SAVED_KEYS if key not in layer]
            if missing:
                raise InvalidInputError("path", f"a saved layer lacks {missing}")
        ids = [
            f"layer{i}/{j}" for i, layer in enumerate(saved) for j in range(len(layer["starts"]))
        ]
        page_bytes = 2 * geometry.kv_heads * config.block_size * geometry.head_dim
        page_bytes *= config.page_dtype_for(dtype).itemsize
        step_pages = config.topk * (1 if selector.shares_selection else geometry.kv_heads)
        below = ReadOnlyTier(source(ids), ids, page_bytes=page_bytes)
        store, owned = open_kv_store(config, device, page_bytes, step_pages, below=below)
        front = store.tiers[0]
        assert isinstance(front, TensorTier)  # open_kv_store puts a tensor tier in front
        router = SlotRouter(front)
        layers = [
            _layer(i, layer, config, selector, dtype, device) for i, layer in enumerate(saved)
        ]
        for built in layers:
            router.add(built.pages)
        return cls(layers, store, router, owned)

    def new_prefix(self) -> str:
        """An id prefix no other session on this context uses."""
        return f"session-{next(self._sessions)}"

    def preload(self) -> None:
        """Bring every page of the context into the front tier (CapacityError when its
        budget cannot hold them): the steps then read no value back to the host."""
        for layer in self.layers:
            pages = layer.pages
            ids = [pages.page_id(i) for i in range(pages.count)]
            for start in range(0, len(ids), 64):  # a bounded number of pages up at a time
                self.store.bring_up(ids[start : start + 64])

    def pages_touched(self) -> int:
        """Pages of the context that some session has read."""
        return sum(layer.pages.touched_count() for layer in self.layers)

    @property
    def page_count(self) -> int:
        """Pages of the context, every layer's."""
        return sum(layer.pages.count for layer in self.layers)

    @property
    def resident_bytes(self) -> int:
        """Bytes the context keeps in memory besides its pages."""
        return sum(layer.nbytes for layer in self.layers)

    def close(self) -> None:
        """Close the store (the read-only tier's source stays with whoever opened it)."""
        for layer in self.layers:
            self.router.remove(layer.pages.prefix)
        self.store.close()
        if self._owned is not None:
            self._owned.cleanup()


def _layer(
    index: int,
    saved: dict[str, Any],
    config: KVConfig,
    selector: PageSelector,
    dtype: torch.dtype,
    device: torch.device,
) -> ContextLayer:
    """One layer, its tensors on the model's device; sinks in buffers of capacity n_init."""
    n_init = config.n_init

    def put(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype)

    sink_k, sink_v = put(saved["sink_k"]), put(saved["sink_v"])
    heads, count, dim = sink_k.shape
    if count > n_init:
        raise InvalidInputError("path", f"layer {index} has {count} sinks; n_init is {n_init}")
    buffers = [torch.zeros(heads, n_init, dim, dtype=dtype, device=device) for _ in range(2)]
    buffers[0][:, :count] = sink_k
    buffers[1][:, :count] = sink_v
    starts = [int(start) for start in saved["starts"].tolist()]
    summaries = put(selector.adopt_summaries(saved["summaries"]))
    if summaries.shape[0] != len(starts):
        raise InvalidInputError("path", f"layer {index}: summaries and pages disagree")
    full = torch.full((len(starts), heads), config.block_size, dtype=torch.long)
    lengths = saved.get("lengths", full)  # saved before regrouped contexts: every page full
    if tuple(lengths.shape) != tuple(full.shape):
        raise InvalidInputError("path", f"layer {index}: page lengths and pages disagree")
    return ContextLayer(
        pages=ContextPages(f"layer{index}", summaries, starts, device, lengths, config.block_size),
        sink_k=buffers[0],
        sink_v=buffers[1],
        sink_count=count,
        window_k=put(saved["window_k"]),
        window_v=put(saved["window_v"]),
        window_start=int(saved["window_start"]),
        selector_state=dict(saved.get("selector", {})),
    )
