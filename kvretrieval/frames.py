"""Answering from retrieved video frames (ReKV): the question picks frames, the answer reads them.

A video session stores one page per frame in each layer's `LayerMemory` (sinks: the system
prompt; pages: frames that left the local window). To answer, every layer scores its frame
summaries with the question's queries and keeps the top-k frames (or the frames an external
retriever named), then attends to one context placed at consecutive positions from 0: the
sinks, the chosen frames in time order, the local window, the question and the answer so
far. Every position stays below sinks + k frames + window + question + answer, positions
the model was trained on, however long the video. The frames' keys and values come from
the page store (promoted from RAM or disk); the video's memory is only read, so a question
leaves it as it was, and the stream can go on after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from memlayer.errors import UnsupportedModelError
from memlayer.kernels import causal_window_attention
from memlayer.kvretrieval.layer_memory import LayerMemory
from memlayer.kvretrieval.window import WindowBuffer


def select_frames(scores: torch.Tensor, k: int, run: int = 1) -> list[int]:
    """The k best frames by `scores` [P], ascending (all of them when k >= P).

    With `run` > 1, frames come in contiguous runs of `run`: runs are ranked by their mean
    score and taken best first without overlap while whole runs fit in k; the frames left
    over are the best single frames not yet taken.
    """
    count = scores.shape[0]
    if k >= count:
        return list(range(count))
    if run <= 1:
        return sorted(scores.topk(k).indices.tolist())
    run = min(run, k)
    means = scores.float().unfold(0, run, 1).mean(dim=-1)
    taken: set[int] = set()
    for start in means.argsort(descending=True).tolist():
        if len(taken) + run > k:
            break
        span = range(start, start + run)
        if not taken.intersection(span):
            taken.update(span)
    for index in scores.argsort(descending=True).tolist():
        if len(taken) == k:
            break
        taken.add(index)
    return sorted(taken)


class FrameContextLayer(CacheLayerMixin):
    """One layer's answer context: sinks, chosen frames, window, question, answer so far.

    `update` (transformers' cache call) and `attend` (memlayer's attention function) arrive
    in that order for each forward. At the first forward the question's keys wait until its
    queries have chosen the frames; from then on the context is one causal window of keys
    rotated at consecutive positions from 0 (`WindowBuffer`, exact placement).
    """

    is_sliding = False

    def __init__(
        self, memory: LayerMemory, retrieve: int, run: int, chosen: Sequence[int] | None = None
    ):
        super().__init__()
        self.memory = memory
        self.retrieve = retrieve
        self.run = run
        self.chosen: list[int] | None = list(chosen) if chosen is not None else None
        heads, dim = memory.window.heads, memory.window.raw_keys().shape[-1]
        template = memory.window.values()
        self.context = WindowBuffer(
            memory.config,
            memory.rotary,
            heads,
            dim,
            template.dtype,
            template.device,
            exact=True,
        )
        self._question: tuple[torch.Tensor, torch.Tensor] | None = None
        self._built = False
        self._spans: list[tuple[int, int]] = []  # context token range of each chosen frame
        self.attention: list[float] = []  # share of the question's attention on each one
        self._read: torch.Tensor | None = None  # summed shares of the answer's queries
        self._reads = 0

    # -- transformers' cache layer interface ------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate lazily."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take a chunk's keys/values [1, Hkv, T, D] (scaled at position 0 by the model)."""
        keys = self.memory.rotary.unscale(key_states[0])
        if self._built:
            self.context.append(keys, value_states[0])
        else:
            self._question = (keys, value_states[0])
        return key_states, value_states

    def get_seq_length(self, *args: Any) -> int:
        return self.context.end

    def get_mask_sizes(self, *args: Any) -> tuple[int, int]:
        query_length = args[0] if args and isinstance(args[0], int) else 0
        return query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise UnsupportedModelError("a video answer is one stream (no beam search)")

    # -- attention --------------------------------------------------------------------------

    def attend(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention [1, Hq, T, D] of the newest T queries over the context."""
        q_raw = self.memory.rotary.unscale(queries)
        question = not self._built
        if question:
            self._build(q_raw)
        context = self.context
        q = context.rotate_queries(q_raw)
        out, lse = causal_window_attention(
            q,
            context.keys()[None],
            context.values()[None],
            scale=scale,
            q_start=context.length - q.shape[2],
        )
        if self._spans:
            shares = self._attention_on_frames(q, lse, scale)  # [T, frames]
            if question:
                self.attention = shares.mean(dim=0).tolist()
                shares = shares[-1:]  # the question's last token predicts the answer's first
            self._read = shares.sum(dim=0) + (self._read if self._read is not None else 0)
            self._reads += shares.shape[0]
        return out

    @property
    def answer_attention(self) -> list[float]:
        """Each chosen frame's share of the attention of the queries that produced the
        answer's tokens (the question's last token, then each answer token fed back), mean
        over those queries: what the answer read it for."""
        if self._read is None:
            return [0.0] * len(self._spans)
        return (self._read / self._reads).tolist()

    def _attention_on_frames(
        self, q: torch.Tensor, lse: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Each query token's share of attention on each chosen frame [T, frames] (softmax
        mass over the frame's tokens, mean over heads)."""
        first, end = self._spans[0][0], self._spans[-1][1]
        keys = self.context.keys()[:, first:end].float()  # [Hkv, n, D]
        heads, kv_heads, tokens = q.shape[1], keys.shape[0], q.shape[2]
        grouped = q[0].float().reshape(kv_heads, heads // kv_heads * tokens, -1)
        logits = torch.bmm(grouped, keys.transpose(1, 2)) * scale  # [Hkv, G·T, n]
        weights = torch.exp(logits - lse[0].float().reshape(kv_heads, -1, 1))
        per_token = weights.reshape(heads, tokens, -1).mean(dim=0)  # [T, n]
        sums = [per_token[:, a - first : b - first].sum(dim=1) for a, b in self._spans]
        return torch.stack(sums, dim=1)

    def _build(self, q_raw: torch.Tensor) -> None:
        """Choose the frames (unless given) and lay out the context, the question last."""
        memory = self.memory
        if self.chosen is None:
            self.chosen = self._retrieve(q_raw)
        keys = [memory.unplaced(memory.sinks.keys(), 0)]
        values = [memory.sinks.values()]
        at = memory.sinks.count
        for frame_keys, frame_values in self._frames(self.chosen):
            keys.append(frame_keys)
            values.append(frame_values)
            self._spans.append((at, at + frame_keys.shape[1]))
            at += frame_keys.shape[1]
        keys.append(memory.window.raw_keys())
        values.append(memory.window.values())
        assert self._question is not None  # update() precedes attend() in every forward
        keys.append(self._question[0])
        values.append(self._question[1])
        self.context.reset(torch.cat(keys, dim=1), torch.cat(values, dim=1), 0)
        self._question = None
        self._built = True

    def _retrieve(self, q_raw: torch.Tensor) -> list[int]:
        """Frames whose summaries score best against the question's queries, placed as the
        layer places queries against memory (at distance n_local, or at the stream's end)."""
        memory = self.memory
        count = memory.pages.count
        if not count:
            return []
        if memory.config.positions == "exact":
            q_memory = memory.rotary.rotate(q_raw, memory.seen)
        else:
            q_memory = memory.memory_queries(q_raw)
        scores = memory.selector.score(q_memory, memory.pages.summaries[:count])
        return select_frames(scores[0].float().sum(dim=0), self.retrieve, self.run)

    def _frames(self, chosen: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Unrotated keys and values [Hkv, S, D] of the chosen pages, in time order, read
        from the page store a front tier's worth (`topk` pages) at a time."""
        memory = self.memory
        pages = memory.pages
        batch = max(memory.config.topk, 1)
        out = []
        for first in range(0, len(chosen), batch):
            indices = chosen[first : first + batch]
            ids = [pages.page_id(i) for i in indices]
            keys = pages.store.gather(ids, "k")
            values = pages.store.gather(ids, "v")
            for row, index in enumerate(indices):
                out.append((memory.unplaced(keys[row], pages.starts[index]), values[row]))
        return out


class FrameContextCache(Cache):
    """The transformers `Cache` of one answer: a `FrameContextLayer` per layer.

    Built over a video session's layer memories (read, never changed). `chosen`, when
    given, names the frames every layer reads (an external retriever's pick); otherwise
    each layer retrieves its own `retrieve` frames (runs of `run`) with the question.
    """

    def __init__(
        self,
        memories: Sequence[LayerMemory],
        *,
        retrieve: int,
        run: int = 1,
        chosen: Sequence[int] | None = None,
    ):
        self.calls = 0  # attention calls routed through memlayer (checked per forward)
        self.memories = [FrameContextLayer(m, retrieve, run, chosen) for m in memories]
        layers: list[Any] = list(self.memories)
        super().__init__(layers=layers)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.memories[layer_idx or 0].context.end

    def get_mask_sizes(self, query_length: int, layer_idx: int | None = 0) -> tuple[int, int]:
        return query_length, 0

    def get_query_offset(self, layer_idx: int | None = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False

    def chosen(self) -> list[list[int]]:
        """The frames (page indices) each layer read, in time order."""
        return [list(layer.chosen or []) for layer in self.memories]

    def attention(self) -> list[list[float]]:
        """Per layer, the share of the question's attention each chosen frame got."""
        return [list(layer.attention) for layer in self.memories]

    def answer_attention(self) -> list[list[float]]:
        """Per layer, each chosen frame's share of the attention of the queries that produced
        the answer (the question's last token and the answer's tokens)."""
        return [layer.answer_attention for layer in self.memories]
