"""In the default `positions="infllm"` mode, with every page selected, KVSession computes
exactly the attention its documented position scheme defines.

The scheme, pinned down from kvretrieval/layer_memory.py (`attend`, `_seal`) and rope.py:

- The model runs chunk by chunk: a feed or a prompt in `chunk_size` pieces from where the
  stream stands, each generated token alone. A layer seals tokens only after the whole
  chunk has been attended, so every query of a chunk that starts at absolute position `s`
  sees the memory as it stood after `s` tokens.
- Sinks: the first tokens to leave the local window, up to `n_init`:
  [0, I) with I = min(n_init, max(0, s - n_local)).
- Pages: once the sinks are full, tokens leave the window one whole block at a time:
  [n_init, n_init + P * block_size) with P = max(0, (s - n_local - n_init) // block_size).
- Local window of the query at t: [W, t] with W = I + P * block_size, that is the last
  `n_local` tokens before the chunk, the block being sealed (the fewer than `block_size`
  older tokens that have left the window but do not fill a page yet), and the chunk's own
  tokens up to t (causal).
- Positions: local keys j at j - W, the query at t - W (true relative distances, counted
  from the window's start); sinks and pages with keys at position 0 and the query at
  `n_local`, however far back they are. One softmax over the union of the three.

The reference below implements that as a plain attention function registered with
transformers for a reference run of the same model over the whole sequence at once, with
its own rotary embedding built from the model's `inv_freq`; it shares no code with
memlayer's attention, cache or kernels.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from kv_models import tiny, twin
from transformers import AttentionInterface

from memlayer import KVSession

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "llama-yarn"]
CONFIGS = {
    "sinks-then-blocks": dict(n_init=3, n_local=8, block_size=4, chunk_size=8),
    "no-sinks-long-chunks": dict(n_init=0, n_local=6, block_size=4, chunk_size=10),
    # chunks of at least cpu_flash.FLASH_FROM queries: the CPU flash path, by parts
    "chunks-through-cpu-flash": dict(n_init=3, n_local=8, block_size=4, chunk_size=36),
}
REFERENCE = "memlayer_test_reference"


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, D] by the RoPE angles of `positions` [T] (no attention scaling).

    The model ran at position 0, so its rotary scaling is already in x: rotating by the
    bare angles gives the model's own rotation at `positions`.
    """
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * angles.cos().to(x.dtype) + turned * angles.sin().to(x.dtype)


@dataclass
class Scheme:
    """The documented position scheme as one attention function, for a reference run."""

    n_init: int
    n_local: int
    block_size: int
    inv_freq: torch.Tensor
    starts: list[int] = field(default_factory=list)  # absolute starts of the forward chunks
    # (layer, chunk start) -> page numbers per KV head (-1: empty slot); absent: every page
    selected: dict[tuple[int, int], list[list[int]]] = field(default_factory=dict)

    def chunk_start(self, t: int) -> int:
        """Start of the forward chunk that holds position t."""
        return self.starts[bisect.bisect_right(self.starts, t) - 1]

    def window_start(self, s: int) -> int:
        """W for a chunk starting at s: sinks and pages end there, the local window begins."""
        sinks = min(self.n_init, max(0, s - self.n_local))
        pages = max(0, (s - self.n_local - self.n_init) // self.block_size)
        return sinks + (pages * self.block_size if sinks == self.n_init else 0)

    def memory(self, layer: int, s: int, kv_head: int) -> torch.Tensor:
        """Positions of the sinks and of the pages one KV head reads for a chunk at s."""
        window = self.window_start(s)
        picked = self.selected.get((layer, s))
        if picked is None:
            return torch.arange(window)
        sinks = min(self.n_init, window)
        spans = [
            torch.arange(self.block_size) + self.n_init + page * self.block_size
            for page in picked[kv_head]
            if page >= 0
        ]
        return torch.cat([torch.arange(sinks), *spans])

    def __call__(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """Output [1, T, Hq, D]: each query over the keys the scheme lets it see."""
        heads, length = query.shape[1], query.shape[2]
        group = heads // key.shape[1]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = torch.empty(length, heads, query.shape[-1])
        for t in range(length):
            s = self.chunk_start(t)
            w = self.window_start(s)
            for h in range(heads):
                keys, values = key[0, h // group], value[0, h // group]
                memory = self.memory(module.layer_idx, s, h // group)
                q = query[0, h, t][None]  # [1, D]
                q_memory = rotate(q, torch.tensor([self.n_local]), self.inv_freq)
                q_local = rotate(q, torch.tensor([t - w]), self.inv_freq)
                k_local = rotate(keys[w : t + 1], torch.arange(t + 1 - w), self.inv_freq)
                logits = torch.cat([q_memory @ keys[memory].T, q_local @ k_local.T], dim=-1)
                weights = torch.softmax(logits * scale, dim=-1)
                out[t, h] = weights @ torch.cat([values[memory], values[w : t + 1]])
        return out[None], None


def chunk_starts(begin: int, length: int, size: int) -> list[int]:
    """Where the forwards of `length` tokens fed from `begin` in `size` pieces start."""
    return list(range(begin, begin + length, size))


class Reference:
    """The model run densely over a whole sequence with `Scheme` as its attention."""

    def __init__(self, model: Any, config: dict[str, int]):
        self.model = model
        self.scheme = Scheme(
            config["n_init"],
            config["n_local"],
            config["block_size"],
            model.model.rotary_emb.inv_freq.clone(),
        )
        AttentionInterface.register(REFERENCE, self.scheme)
        model.set_attn_implementation(REFERENCE)

    def logits(self, ids: list[int], starts: list[int]) -> torch.Tensor:
        """Logits [T, vocab] of `ids` whose forwards started at `starts`."""
        self.scheme.starts = starts
        tokens = torch.tensor([ids])
        with torch.no_grad():
            out = self.model(input_ids=tokens, position_ids=torch.zeros_like(tokens))
        return out.logits[0]


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_reference_is_the_dense_model_while_nothing_left_the_window(family: str) -> None:
    """Checks the reference itself: with the window start at 0 it must be plain attention."""
    dense = tiny(family)
    ids = _ids(40, seed=2)
    config = dict(n_init=3, n_local=32, block_size=4)
    reference = Reference(twin(dense), config)
    logits = reference.logits(ids, chunk_starts(0, 40, 8))
    assert {reference.scheme.window_start(s) for s in chunk_starts(0, 40, 8)} == {0}
    with torch.no_grad():
        expected = dense(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)


def _session(dense: Any, selector: str, topk: int, config: dict[str, int]) -> KVSession:
    """A session on a copy of `dense` with float32 pages (the reference keeps float32 keys)."""
    return KVSession(
        twin(dense),
        None,
        progress=False,
        selector=selector,
        topk=topk,
        page_dtype="model",
        **config,
    )


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("selector", ["infllm", "quest"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_page_selected_equals_the_reference(
    family: str, selector: str, config_name: str
) -> None:
    config = CONFIGS[config_name]
    dense = tiny(family)
    fed, prompt = _ids(90, seed=3), _ids(5, seed=4)
    reference = Reference(twin(dense), config)
    size = config["chunk_size"]

    session = _session(dense, selector, 1000, config)
    logits = session._forward(fed, all_logits=True)
    pages = session.stats()["pages"]
    assert 0 < pages // len(session.cache.memories) <= session.config.topk  # all pages picked
    expected = reference.logits(fed, chunk_starts(0, 90, size))
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)

    session = _session(dense, selector, 1000, config)
    session.feed(fed)
    tokens = session.continue_ids(prompt, 8)
    # The prompt runs in chunks from position 90, then each generated token alone. The
    # reference is causal, so matching its argmax at every step is matching its own greedy.
    starts = chunk_starts(0, 90, size) + chunk_starts(90, 5, size) + list(range(95, 102))
    steps = reference.logits(fed + prompt + tokens[:-1], starts)[94:]
    assert tokens == steps.argmax(dim=-1).tolist()


def record_selection(session: KVSession) -> dict[tuple[int, int], list[list[int]]]:
    """Record, per layer and chunk start, the pages each KV head is given by the selector."""
    picks: dict[tuple[int, int], list[list[int]]] = {}
    for layer, memory in enumerate(session.cache.memories):

        def select(
            q_memory: torch.Tensor, *args: Any, layer: int = layer, memory: Any = memory
        ) -> Any:
            chosen = type(memory).select(memory, q_memory, *args)
            picks[(layer, memory.seen - q_memory.shape[2])] = chosen[0].tolist()
            return chosen

        memory.select = select
        memory.fused_selection = None  # every step through `select` (no one-call step)
    return picks


@pytest.mark.parametrize("selector", ["infllm", "quest"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_kv_head_reads_exactly_the_pages_selected_for_it(family: str, selector: str) -> None:
    """With 2 pages of about 20 selected, the reference reads the same pages per KV head.

    All-pages selection cannot tell the heads' page lists apart; here Quest gives the KV
    heads different pages, so a page routed to the wrong head shows.
    """
    config = CONFIGS["sinks-then-blocks"]
    dense = tiny(family)
    fed = _ids(90, seed=3)
    session = _session(dense, selector, 2, config)
    picks = record_selection(session)
    logits = session._forward(fed, all_logits=True)
    if selector == "quest":
        assert any(len({tuple(pages) for pages in heads}) > 1 for heads in picks.values())
    reference = Reference(twin(dense), config)
    reference.scheme.selected = picks
    expected = reference.logits(fed, chunk_starts(0, 90, config["chunk_size"]))
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
